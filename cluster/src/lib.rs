//! What every Tandem role shares: the config schema ([`config`]), cluster
//! membership ([`membership`]: static, or etcd through [`etcd`] on the
//! router's side and [`registration`] on a node's, with the records and keys
//! in [`node_record`]), what a node serves ([`fingerprint`]), mutual TLS on the internal gRPC services
//! ([`grpc_tls`]), limits on accepted connections ([`listener`]) and
//! conversions between wire and engine types ([`convert`], and for the KV
//! cache's element type [`kv_dtype`]).

pub mod config;
pub mod convert;
pub mod etcd;
pub mod fingerprint;
pub mod grpc_tls;
pub mod kv_dtype;
pub mod listener;
pub mod membership;
pub mod node_record;
pub mod registration;

pub use config::{
    Config, ConfigError, ConnectionsSection, DEFAULT_MODEL_PATH, DecodeSection, EtcdSection,
    MembershipSection, MetricsSection, ModelSection, PrefillSection, RouterSection,
    SYNTH_MODEL_DIR, TlsSection,
};
pub use etcd::EtcdMembership;
pub use fingerprint::{FingerprintError, ModelFingerprint};
pub use grpc_tls::{GrpcTls, GrpcTlsError};
pub use membership::{Member, Membership, Role, StaticMembership};
pub use node_record::{Capacity, NodeRecord};
pub use registration::Registration;
