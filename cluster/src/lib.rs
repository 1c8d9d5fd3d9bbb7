//! What every Tandem role shares: the config schema ([`config`]), cluster
//! membership ([`membership`]) and conversions between wire and engine types
//! ([`convert`]).

pub mod config;
pub mod convert;
pub mod membership;

pub use config::{
    Config, ConfigError, DEFAULT_MODEL_DIR as DEFAULT_MODEL_DIR_PATH, DecodeSection, ModelSection,
    PrefillSection, RouterSection, TlsSection,
};
pub use membership::{Member, Membership, Role, StaticMembership};
