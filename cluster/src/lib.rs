//! What every Tandem role shares: the config schema ([`config`]), cluster
//! membership ([`membership`]: static, or etcd through [`etcd`] on the
//! router's side and [`registration`] on a node's, with the records and keys
//! in [`node_record`]), mutual TLS on the internal gRPC services
//! ([`grpc_tls`]), limits on accepted connections ([`listener`]) and
//! conversions between wire and engine types ([`convert`]).

pub mod config;
pub mod convert;
pub mod etcd;
pub mod grpc_tls;
pub mod listener;
pub mod membership;
pub mod node_record;
pub mod registration;
pub mod routing;

pub use config::{
    Config, ConfigError, ConnectionsSection, DEFAULT_MODEL_PATH, DecodeSection, EtcdSection,
    MembershipSection, MetricsSection, ModelSection, PrefillSection, RouterSection,
    SYNTH_MODEL_DIR, TlsSection,
};
pub use etcd::EtcdMembership;
pub use grpc_tls::{GrpcTls, GrpcTlsError};
pub use membership::{Member, Membership, Role, StaticMembership};
pub use node_record::{Capacity, NodeRecord};
pub use registration::Registration;
pub use routing::RoutingPolicy;
