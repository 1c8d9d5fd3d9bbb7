//! What every Tandem role shares: the config schema ([`config`]), cluster
//! membership ([`membership`]) and conversions between wire and engine types
//! ([`convert`]).

pub mod config;
pub mod convert;
pub mod membership;

pub use config::{Config, ConfigError, DecodeSection, ModelSection, PrefillSection, RouterSection};
pub use membership::{Member, Membership, Role, StaticMembership};
