//! Checking a `PrefillRequest` against the local model and cache before any
//! of it is queued, so bad input is an `INVALID_ARGUMENT` naming the problem
//! and never a failure halfway through a prefill.

use std::net::SocketAddr;

use tandem_cluster::kv_dtype;
use tandem_engine::block_manager::blocks_for;
use tandem_engine::{ModelConfig, SamplingParams};
use tandem_kv_transfer::WireDtype;
use tandem_proto::v1 as pb;

use crate::error::PrefillError;

/// What the node serves: the model's and the cache's shape.
#[derive(Debug, Clone)]
pub(crate) struct NodeShape {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// What the cache holds and frames carry (f32 on the CPU, bf16 on CUDA).
    pub kv_dtype: WireDtype,
}

impl NodeShape {
    pub fn new(config: &ModelConfig, block_size: usize) -> Self {
        NodeShape {
            vocab_size: config.vocab_size,
            max_position_embeddings: config.max_position_embeddings,
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            block_size,
            kv_dtype: WireDtype::F32,
        }
    }

    /// Checks that every shape field fits the wire's 16-bit fields.
    pub fn check_wire_limits(&self) -> Result<(), PrefillError> {
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
        ] {
            if v == 0 || v > usize::from(u16::MAX) {
                return Err(PrefillError::Config(format!(
                    "{name} = {v} does not fit the KV wire format (1..=65535)"
                )));
            }
        }
        Ok(())
    }
}

/// Where a request's KV goes, checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KvDestination {
    pub addr: SocketAddr,
    /// Every endpoint of the receiver, `addr` first.
    pub addrs: Vec<SocketAddr>,
    pub server_name: String,
    pub cert_der: Vec<u8>,
    pub transfer_id: u64,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct ValidPrefill {
    pub request_id: String,
    /// The prompt, then the tokens generated before a resume.
    pub prompt: Vec<u32>,
    /// How many of `prompt`'s last tokens were generated.
    pub generated: usize,
    pub sampling: SamplingParams,
    /// Top log probabilities asked for the first token; `None`: none.
    pub logprobs: Option<usize>,
    /// Ids the first token may not be (`PrefillRequest.banned_token_ids`).
    pub banned: Vec<u32>,
    /// `PrefillRequest.constraint`.
    pub constraint: Option<tandem_engine::Constraint>,
    pub target: KvDestination,
    /// Leading blocks the decode node holds (`KvTarget.cached_blocks`): not shipped.
    pub held_blocks: usize,
    /// `PrefillRequest.cache_salt`.
    pub cache_salt: String,
}

fn invalid(m: String) -> PrefillError {
    PrefillError::InvalidRequest(m)
}

/// Checks the prompt, sampling parameters and KV target of `req`.
pub(crate) async fn validate(
    shape: &NodeShape,
    req: pb::PrefillRequest,
) -> Result<ValidPrefill, PrefillError> {
    if req.request_id.is_empty() {
        return Err(invalid("request_id is empty".into()));
    }
    if req.prompt.is_empty() {
        return Err(invalid(
            "prompt is empty: a prefill needs at least one token".into(),
        ));
    }
    let generated = req.generated.len();
    let mut prompt = req.prompt;
    prompt.extend_from_slice(&req.generated);
    if let Some((i, &t)) = prompt
        .iter()
        .enumerate()
        .find(|&(_, &t)| t as usize >= shape.vocab_size)
    {
        return Err(invalid(format!(
            "prompt token {i} has id {t}, beyond the vocabulary of {} tokens",
            shape.vocab_size
        )));
    }
    if prompt.len() > shape.max_position_embeddings {
        return Err(invalid(format!(
            "prompt of {} tokens is longer than the model's context of {} tokens",
            prompt.len(),
            shape.max_position_embeddings
        )));
    }
    let sampling = tandem_cluster::convert::checked_sampling_from_pb(req.sampling.as_ref())
        .map_err(|e| invalid(e.to_string()))?;
    if let Some(n) = req.logprobs
        && n as usize > tandem_engine::MAX_TOP_LOGPROBS
    {
        return Err(invalid(format!(
            "logprobs must be at most {}, got {n}",
            tandem_engine::MAX_TOP_LOGPROBS
        )));
    }
    if let Some(&t) = req
        .banned_token_ids
        .iter()
        .find(|&&t| t as usize >= shape.vocab_size)
    {
        return Err(invalid(format!(
            "banned_token_ids has id {t}, beyond the vocabulary of {} tokens",
            shape.vocab_size
        )));
    }
    let target = req
        .kv_target
        .as_ref()
        .ok_or_else(|| invalid("kv_target is missing".into()))?;
    let needed = blocks_for(prompt.len(), shape.block_size);
    let held_blocks = target.cached_blocks as usize;
    // The decode node never claims the block of the last token (its KV is
    // computed here with the first token's logits), so something is shipped.
    let claimable = (prompt.len() - 1) / shape.block_size;
    if held_blocks > claimable {
        return Err(invalid(format!(
            "kv_target.cached_blocks is {held_blocks} but a prompt of {} tokens leaves at most {claimable} full blocks before its last token",
            prompt.len()
        )));
    }
    let target = validate_target(shape, target, needed).await?;
    Ok(ValidPrefill {
        // The job, its Cancel and its cancel-on-drop are per attempt.
        request_id: tandem_proto::attempt_key(&req.request_id, req.attempt),
        prompt,
        generated,
        sampling,
        logprobs: req.logprobs.map(|n| n as usize),
        banned: req.banned_token_ids,
        constraint: tandem_cluster::convert::constraint_from_pb(req.constraint.as_ref()),
        target,
        held_blocks,
        cache_salt: req.cache_salt,
    })
}

async fn validate_target(
    shape: &NodeShape,
    t: &pb::KvTarget,
    blocks_needed: usize,
) -> Result<KvDestination, PrefillError> {
    let checks = [
        ("num_layers", t.num_layers as usize, shape.num_layers),
        ("num_kv_heads", t.num_kv_heads as usize, shape.num_kv_heads),
        ("head_dim", t.head_dim as usize, shape.head_dim),
        ("block_size", t.block_size as usize, shape.block_size),
    ];
    for (name, got, want) in checks {
        if got != want {
            return Err(invalid(format!(
                "kv_target.{name} is {got} but this prefill node's model/cache has {want}"
            )));
        }
    }
    if (t.num_blocks as usize) < blocks_needed {
        return Err(invalid(format!(
            "kv_target.num_blocks is {} but the prompt needs {blocks_needed} blocks",
            t.num_blocks
        )));
    }
    // The decode node quantizes a wider dtype into its fp8 cache; anything
    // else must match.
    match kv_dtype::wire_from_pb(t.dtype) {
        Some(theirs) if shape.kv_dtype.imports_into(theirs) => {}
        Some(theirs) => {
            return Err(PrefillError::KvDtypeMismatch {
                ours: kv_dtype::name(shape.kv_dtype),
                theirs: kv_dtype::name(theirs).into(),
            });
        }
        None => {
            return Err(invalid(format!(
                "kv_target.dtype {} is not a KV dtype this node knows (its cache sends {})",
                t.dtype,
                kv_dtype::name(shape.kv_dtype)
            )));
        }
    }
    if t.quic_addr.is_empty() {
        return Err(invalid("kv_target.quic_addr is empty".into()));
    }
    let addr = tokio::net::lookup_host(t.quic_addr.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            invalid(format!(
                "kv_target.quic_addr {:?} is not a resolvable host:port",
                t.quic_addr
            ))
        })?;
    let mut addrs = vec![addr];
    for extra in t.quic_addrs.iter().filter(|a| **a != t.quic_addr) {
        let resolved = extra.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "kv_target.quic_addrs entry {extra:?} is not an ip:port"
            ))
        })?;
        addrs.push(resolved);
    }
    if t.server_cert_der.is_empty() {
        return Err(PrefillError::NoTrustAnchor(t.quic_addr.clone()));
    }
    let server_name = if t.server_name.is_empty() {
        t.quic_addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_default()
    } else {
        t.server_name.clone()
    };
    Ok(KvDestination {
        addr,
        addrs,
        server_name,
        cert_der: t.server_cert_der.to_vec(),
        transfer_id: t.transfer_id,
    })
}
