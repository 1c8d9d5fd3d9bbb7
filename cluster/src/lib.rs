//! What every Tandem role shares: the config schema ([`config`], with the
//! router's client keys and TLS in [`client_access`]), cluster
//! membership ([`membership`]: static, or etcd through [`etcd`] on the
//! router's side and [`registration`] on a node's, with the records and keys
//! in [`node_record`]), what a node serves ([`fingerprint`]), mutual TLS on the internal gRPC services
//! ([`grpc_tls`], the `http`/`https` scheme of node addresses in
//! [`node_scheme`]), limits on accepted connections ([`listener`]), TLS on them with
//! certificates reloaded when their files change ([`tls_listener`],
//! [`cert_reload`]) and
//! conversions between wire and engine types ([`convert`], and for the KV
//! cache's element type [`kv_dtype`]).

pub mod cert_reload;
pub mod client_access;
pub mod config;
pub mod convert;
pub mod etcd;
pub mod fingerprint;
pub mod grpc_tls;
pub mod kv_dtype;
pub mod listener;
pub mod membership;
pub mod node_record;
pub mod node_scheme;
pub mod registration;
pub mod routing;
pub mod tls_listener;

pub use config::{
    ApiKeySection, ClientTlsSection, Config, ConfigError, ConnectionsSection, DEFAULT_MODEL_PATH,
    DecodeSection, EtcdSection, KvCacheDtype, MembershipSection, MetricsSection, ModelSection,
    PrefillSection, RouterSection, SYNTH_MODEL_DIR, TlsSection,
};
pub use etcd::EtcdMembership;
pub use fingerprint::{FingerprintError, ModelFingerprint};
pub use grpc_tls::{GrpcTls, GrpcTlsError};
pub use membership::{Member, Membership, Role, StaticMembership};
pub use node_record::{Capacity, NodeRecord};
pub use registration::Registration;
pub use routing::RoutingPolicy;
