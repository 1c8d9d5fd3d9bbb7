//! Choosing nodes for one attempt of a request: the reservation at a decode
//! node (best first, waiting while all are full), the prefill node to use,
//! the KV wait the reservation asks for, and the ordering that puts nodes
//! that already failed this request last.

use super::*;

/// A reservation at a decode node: its answer and the stream that follows.
pub(super) struct Reserved {
    pub(super) node: NodeHandle,
    pub(super) admitted: pb::Admitted,
    pub(super) stream: Streaming<pb::DecodeResponse>,
    /// The prefill node named to the decode node (`prefill_peer`), to use
    /// if it asks for a remote prefill.
    pub(super) prefill: Option<NodeHandle>,
    /// The request counted in the decode node's load until it finishes there.
    pub(super) assignment: Option<Assignment>,
}

impl Request<'_> {
    /// Reserves the request at a decode node: the best one first, then the
    /// others; when all are full, it waits its turn in the pool's
    /// [`DecodeQueue`](crate::decode_queue::DecodeQueue), and at the head asks
    /// again when a request ends at a decode node, at least every
    /// [`FULL_BACKOFF`], until the deadline. With
    /// `router.decode_waiting`, a node whose batch and waiting room are full
    /// is not asked, and when none has room the head waits to be woken.
    pub(super) async fn reserve(
        &self,
        guard: &mut CancelGuard,
        generated: &[u32],
        avoid: &[NodeAddr],
        pin: Option<&NodeAddr>,
        prompt_logprobs: Option<u32>,
    ) -> Result<Reserved, RouterError> {
        let nodes = &self.relay.nodes;
        let queue = nodes.decode_queue();
        // This request's place among those waiting for room at a decode
        // node (`router.decode_waiting`); only the head looks for room, and a
        // newcomer joins behind the waiting ones.
        let mut place = (!queue.is_empty()).then(|| queue.join());
        let mut refused_for_blocks = false;
        loop {
            if let Some(p) = &place
                && !p.is_head()
            {
                self.wait_turn(p).await?;
                continue;
            }
            let tokens = self.routed_tokens(generated);
            let mut ranked = prefer_unfailed(
                nodes.ranked_for(Role::Decode, &tokens, &self.req.cache_salt),
                avoid,
            );
            // A later sample of an `n` > 1 request goes to the decode node
            // holding the prompt's KV and prefills there from its cached blocks.
            let pinned = pin.is_some_and(|p| ranked.iter().any(|n| n.addr == *p));
            if pinned {
                ranked.retain(|n| pin == Some(&n.addr));
            }
            if ranked.is_empty() {
                if !nodes.has(Role::Decode) {
                    return Err(RouterError::NoNode("decode"));
                }
                return Err(RouterError::NoUsableNode {
                    role: "decode",
                    retry_after_s: nodes.retry_after_s(),
                });
            }
            // No usable prefill node (none registered, all failing): the
            // decode node prefills the prompt itself.
            let local = pinned || !nodes.usable(Role::Prefill, avoid);
            let prefill = if local {
                None
            } else {
                self.usable_prefill(avoid, &tokens)
            };
            let request = pb::DecodeRequest {
                prefill_peer: prefill
                    .as_ref()
                    .map(|n| n.addr.to_string())
                    .unwrap_or_default(),
                prefill_queue_seconds: prefill.as_ref().map_or(0.0, |n| self.prefill_wait_s(n)),
                request_id: self.req.request_id.clone(),
                prompt: self.req.prompt.clone(),
                sampling: Some(self.req.sampling.clone()),
                max_tokens: self.req.max_tokens,
                stop: self.req.stop.clone(),
                stop_token_ids: self.req.stop_token_ids.clone(),
                ignore_eos: self.req.ignore_eos,
                include_stop_str_in_output: self.req.include_stop_str_in_output,
                keep_special_tokens: self.req.keep_special_tokens,
                no_spaces_between_special_tokens: self.req.no_spaces_between_special_tokens,
                kv_timeout_ms: self.kv_timeout_ms(local, generated.len(), avoid),
                force_local_prefill: local,
                generated: generated.to_vec(),
                logprobs: self.req.logprobs,
                prompt_logprobs,
                attempt: guard.attempt,
                min_tokens: self.req.min_tokens,
                constraint: self.req.constraint.clone(),
                cache_salt: self.req.cache_salt.clone(),
            };
            let mut full = None;
            let mut failed = None;
            // With `router.decode_waiting`, a node whose batch and waiting
            // room are full gets nothing more; when no node takes the
            // request, it waits here for one to finish a request.
            let mut no_room = false;
            let prompt_tokens = self.req.prompt.len() + generated.len();
            for node in ranked {
                let Ok(assignment) = nodes.assign_with_room(&node.addr, prompt_tokens) else {
                    no_room = true;
                    continue;
                };
                // Counted at the node: the next waiting request may look;
                // one refused for blocks before keeps its place until a node
                // takes it (the rest would each ask the full node again).
                if !refused_for_blocks {
                    drop(place.take());
                }
                guard.decode = Some(node.clone());
                nodes.note_sent(&node.addr);
                match self.watch(self.try_decode(&node, request.clone())).await {
                    Ok(mut reserved) => {
                        reserved.prefill = prefill;
                        reserved.assignment = assignment;
                        nodes.record_success(&node.addr);
                        return Ok(reserved);
                    }
                    Err(err) => {
                        // The node answered: it holds nothing for the request.
                        guard.decode = None;
                        match err {
                            RouterError::NodeExhausted { .. } => {
                                // Refused for room: the node's load never had it.
                                if let Some(a) = assignment {
                                    a.refused();
                                }
                                full = Some(err)
                            }
                            RouterError::NodeUnavailable { .. } | RouterError::Protocol { .. } => {
                                warn!(node = %node.addr, "decode node failed, trying another: {err}");
                                nodes.mark_failed(&node.addr);
                                failed = Some(err);
                            }
                            other => return Err(other),
                        }
                    }
                }
            }
            if no_room {
                // At the head, woken when a request ends at a decode node or
                // a report comes (a wake since the look above is kept).
                debug!("every decode node's batch and waiting room are full");
                match &place {
                    // Just queued: a request that ended before it joined
                    // woke nobody, so it looks once more first.
                    None => place = Some(queue.join()),
                    Some(p) => self.wait_turn(p).await?,
                }
                continue;
            }
            let Some(full) = full else {
                return Err(failed.unwrap_or(RouterError::NoNode("decode")));
            };
            debug!("every decode node is full: {full}");
            if Instant::now() + FULL_BACKOFF >= self.deadline {
                return Err(self.deadline_exceeded());
            }
            // In line with the others waiting: only the head asks again, when
            // a request ends at a decode node (its blocks are free) or after
            // FULL_BACKOFF (another router's requests may have ended); the rest
            // wait until it leaves, so a full node is not asked by every
            // waiting request every few ms.
            let ours = place.get_or_insert_with(|| queue.join());
            refused_for_blocks = true;
            self.watch(async {
                let _ = tokio::time::timeout(FULL_BACKOFF, ours.woken()).await;
                Ok(())
            })
            .await?;
        }
    }

    /// The best usable prefill node, those that failed this request last.
    pub(super) fn usable_prefill(&self, failed: &[NodeAddr], tokens: &[u32]) -> Option<NodeHandle> {
        let nodes = &self.relay.nodes;
        prefer_unfailed(
            nodes.ranked_for(Role::Prefill, tokens, &self.req.cache_salt),
            failed,
        )
        .into_iter()
        .next()
    }

    /// Waits until `place` is woken (a request ended at a decode node, a
    /// report came, or the head before it left), or the request ends.
    async fn wait_turn(&self, place: &crate::decode_queue::Place<'_>) -> Result<(), RouterError> {
        self.watch(async {
            place.woken().await;
            Ok(())
        })
        .await
    }

    /// The wait in `node`'s prefill queue, in seconds: its queued prompt
    /// tokens at its measured rate (else the cluster's average); 0 unknown.
    fn prefill_wait_s(&self, node: &NodeHandle) -> f64 {
        let nodes = &self.relay.nodes;
        let Some((queued, rate)) = nodes.prefill_queue(&node.addr) else {
            return 0.0;
        };
        let rate = rate.or_else(|| {
            let b = nodes.prefill_backlog();
            (b.nodes > 0 && b.tokens_per_s > 0.0).then(|| b.tokens_per_s / b.nodes as f64)
        });
        match rate {
            Some(r) if r > 0.0 => queued as f64 / r,
            _ => 0.0,
        }
    }

    /// The KV wait for a reservation: the base, plus (for a remote prefill)
    /// the time the likely prefill node needs for what is queued there and
    /// this prompt, at its measured rate (else the cluster's average), capped.
    pub(super) fn kv_timeout_ms(&self, local: bool, generated: usize, avoid: &[NodeAddr]) -> u32 {
        let base = Duration::from_millis(u64::from(self.relay.kv_timeout_ms));
        let max = Duration::from_millis(u64::from(self.relay.kv_timeout_max_ms));
        if local {
            return self.relay.kv_timeout_ms;
        }
        let nodes = &self.relay.nodes;
        let Some((queued, rate)) = self
            .usable_prefill(avoid, &self.req.prompt)
            .and_then(|n| nodes.prefill_queue(&n.addr))
        else {
            return self.relay.kv_timeout_ms;
        };
        let rate = rate.or_else(|| {
            let b = nodes.prefill_backlog();
            (b.nodes > 0 && b.tokens_per_s > 0.0).then(|| b.tokens_per_s / b.nodes as f64)
        });
        // Requests admitted alongside this one and not yet given a prefill
        // node will be prefilled beside it (the node interleaves prompts).
        let pending = self.relay.pending_prefill.load(Ordering::Acquire);
        let ahead = queued
            .saturating_add(pending)
            .saturating_add((self.req.prompt.len() + generated) as u64);
        let wait = crate::backlog::kv_wait(base, max, ahead, rate);
        u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)
    }

    /// The tokens whose KV a node may hold for this attempt: the prompt,
    /// then what was generated before a retry.
    pub(super) fn routed_tokens(&self, generated: &[u32]) -> std::borrow::Cow<'_, [u32]> {
        if generated.is_empty() {
            std::borrow::Cow::Borrowed(&self.req.prompt)
        } else {
            std::borrow::Cow::Owned([&self.req.prompt[..], generated].concat())
        }
    }

    /// Calls `Decode` on one node and reads its first answer.
    pub(super) async fn try_decode(
        &self,
        node: &NodeHandle,
        request: pb::DecodeRequest,
    ) -> Result<Reserved, RouterError> {
        let mut client = DecodeNodeClient::new(node.channel.clone());
        let reservation = async {
            let mut stream = client.decode(request).await?.into_inner();
            let first = stream.message().await;
            Ok::<_, Status>((stream, first))
        };
        // A node that stopped answering (a paused process) must not hold the
        // request; one that still sends load reports is alive, and answers
        // admissions between engine steps, which a long local prefill (a
        // long prompt on a CPU) makes seconds long: that request waits, as
        // it would in the node's queue, rather than failing the node.
        let limit = self.relay.nodes.stale_after();
        let mut reservation = std::pin::pin!(reservation);
        let (stream, first) = loop {
            match tokio::time::timeout(limit, reservation.as_mut()).await {
                Ok(Ok(answer)) => break answer,
                Ok(Err(s)) => return Err(RouterError::from_node_status(&node.addr, &s)),
                Err(_) if self.relay.nodes.is_reporting(&node.addr) => {
                    debug!(node = %node.addr, "no answer to the reservation yet; the node still reports");
                }
                Err(_) => {
                    return Err(RouterError::NodeUnavailable {
                        node: node.addr.clone(),
                        message: format!(
                            "no answer to the reservation and no load report within {limit:?}"
                        ),
                    });
                }
            }
        };
        match first {
            Ok(Some(pb::DecodeResponse {
                event: Some(DecodeEvent::Admitted(admitted)),
            })) => Ok(Reserved {
                node: node.clone(),
                admitted,
                stream,
                prefill: None,
                assignment: None,
            }),
            Ok(Some(_)) => Err(self.protocol(node, "a Decode stream not starting with Admitted")),
            Ok(None) => Err(RouterError::NodeUnavailable {
                node: node.addr.clone(),
                message: "the decode stream ended before Admitted".into(),
            }),
            Err(s) => Err(RouterError::from_node_status(&node.addr, &s)),
        }
    }
}

/// `nodes` in their order, but those in `failed` last.
pub(super) fn prefer_unfailed(mut nodes: Vec<NodeHandle>, failed: &[NodeAddr]) -> Vec<NodeHandle> {
    // A stable sort keeps the ranking within each group.
    nodes.sort_by_key(|n| failed.contains(&n.addr));
    nodes
}
