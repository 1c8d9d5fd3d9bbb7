//! One attempt of a request: the reservation, the prefill (remote or on the
//! decode node), and the decode stream relayed to the client token by token.

use super::*;

impl Request<'_> {
    /// One run of the request on a decode node (and a prefill node), continuing
    /// after the tokens in `progress`.
    pub(super) async fn attempt(
        &self,
        progress: &mut Progress,
        failed: &[NodeAddr],
        attempt: u32,
    ) -> Result<(), RouterError> {
        let mut guard = CancelGuard {
            request_id: self.req.request_id.clone(),
            attempt,
            decode: None,
            prefill: None,
        };
        let Reserved {
            node: decode,
            admitted,
            mut stream,
            prefill: named_prefill,
            assignment: decode_assignment,
        } = self
            .reserve(
                &mut guard,
                &progress.sent,
                failed,
                progress.placement.pin(attempt),
                // Sample 0 carries them, once.
                self.req.prompt_logprobs.filter(|_| {
                    !progress.prompt_logprobs_sent && !progress.placement.is_later_sample()
                }),
            )
            .await?;
        progress.admitted_at.get_or_insert_with(Instant::now);
        progress.spans.admitted(Instant::now());
        progress.decode = Some(decode.addr.clone());
        debug!(node = %decode.addr, local_prefill = admitted.local_prefill, "admitted");

        if admitted.local_prefill {
            // The decode node prefills it: no longer prefill work pending.
            progress.pending = None;
        }
        let mut prefill: Option<PrefillCall> = None;
        // The prefill node of this attempt, if any: a finished request proves it worked.
        let mut prefill_addr: Option<NodeAddr> = None;
        // The prompt counted in the prefill node's load until the node is
        // done with it: it answered, or the decode node has the KV.
        let mut prefill_assignment = None;
        if !admitted.local_prefill {
            let target = admitted.kv_target.ok_or_else(|| RouterError::Protocol {
                node: decode.addr.clone(),
                message: "Admitted for remote prefill without a kv_target".into(),
            })?;
            let tokens = self.routed_tokens(&progress.sent);
            // The node named to the decode node, whose link it weighed.
            let node = named_prefill
                .or_else(|| self.usable_prefill(failed, &tokens))
                .ok_or(RouterError::NoNode("prefill"))?;
            debug!(node = %node.addr, "prefill");
            // While its breaker is half-open, the request is one of its trials.
            self.relay.nodes.note_sent(&node.addr);
            prefill_assignment = self
                .relay
                .nodes
                .assign(&node.addr, self.req.prompt.len() + progress.sent.len());
            let mut client = PrefillNodeClient::new(node.channel.clone());
            let request = pb::PrefillRequest {
                request_id: self.req.request_id.clone(),
                prompt: self.req.prompt.clone(),
                sampling: Some(self.req.sampling.clone()),
                kv_target: Some(target),
                generated: progress.sent.clone(),
                logprobs: self.req.logprobs,
                attempt,
                banned_token_ids: if progress.sent.len() < self.req.min_tokens as usize {
                    self.req.min_tokens_banned.clone()
                } else {
                    Vec::new()
                },
                constraint: self.req.constraint.clone(),
                cache_salt: self.req.cache_salt.clone(),
            };
            prefill_addr = Some(node.addr.clone());
            // Counted in the node's queue from now on.
            progress.pending = None;
            guard.prefill = Some(node);
            progress.spans.prefill_sent(Instant::now());
            prefill = Some(Box::pin(async move { client.prefill(request).await }));
        }

        // Prompt tokens the prefill node took from its cache, once it answers.
        let mut prefill_cached = 0;
        let mut last_event = Instant::now();
        // Tokens the decode node sent in this attempt.
        let mut tokens = 0usize;
        let mut stall_check = tokio::time::interval(STALL_CHECK);
        loop {
            let prefill_done = async {
                match prefill.as_mut() {
                    Some(call) => call.await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                _ = self.relay.shutdown.cancelled() => return Err(RouterError::ShuttingDown),
                _ = self.tx.closed() => return Err(RouterError::ClientGone),
                _ = tokio::time::sleep_until(self.deadline) => return Err(self.deadline_exceeded()),
                _ = stall_check.tick() => {
                    self.check_answering(&guard, last_event)?;
                    continue;
                }
                result = prefill_done => {
                    prefill = None;
                    drop(prefill_assignment.take());
                    // The prefill node is done with the request either way.
                    let node = guard.prefill.take();
                    match result {
                        Ok(r) => {
                            let r = r.into_inner();
                            progress.spans.prefill_answered(&r);
                            if let Some(n) = &node {
                                self.relay.nodes.record_success(&n.addr);
                            }
                            debug!(
                                first_token = r.first_token,
                                queue_s = r.queue_seconds,
                                compute_s = r.compute_seconds,
                                kv_bytes = r.kv_bytes_sent,
                                cached_tokens = r.cached_tokens,
                                "prefilled"
                            );
                            prefill_cached = r.cached_tokens;
                            continue;
                        }
                        Err(status) => {
                            let addr = node.map(|n| n.addr).unwrap_or_default();
                            return Err(RouterError::from_node_status(&addr, &status));
                        }
                    }
                }
                next = stream.message() => next,
            };
            last_event = Instant::now();
            let event = match next {
                Ok(Some(pb::DecodeResponse { event: Some(e) })) => e,
                Ok(Some(pb::DecodeResponse { event: None })) => {
                    return Err(self.protocol(&decode, "a response without an event"));
                }
                Ok(None) => {
                    return Err(RouterError::NodeUnavailable {
                        node: decode.addr.clone(),
                        message: "the decode stream ended before Finished".into(),
                    });
                }
                Err(status) => return Err(RouterError::from_node_status(&decode.addr, &status)),
            };
            match event {
                DecodeEvent::Token(chunk) => {
                    tokens += 1;
                    // The prompt's KV is at the decode node once it prefilled
                    // it, the prefill node answered (every byte delivered), or
                    // a second token came (a first one may come from the
                    // prefill node's Final frame, ahead of its layers).
                    let kv_here = admitted.local_prefill || prefill.is_none() || tokens > 1;
                    if kv_here {
                        drop(prefill_assignment.take());
                    }
                    self.relay_token(chunk, progress, kv_here).await?;
                }
                DecodeEvent::Finished(mut finished) => {
                    // The decode node is done with the request (one its first
                    // token ended keeps its blocks there until its KV lands).
                    guard.decode = None;
                    drop(decode_assignment);
                    drop(prefill_assignment.take());
                    // Its first token came, so the prefill node did its part.
                    if let Some(addr) = &prefill_addr {
                        self.relay.nodes.record_success(addr);
                    }
                    // The prompt's KV is at the decode node when it prefilled it
                    // or the prefill node answered (every byte delivered).
                    let mut kv_here = prefill.is_none();
                    if let Some(call) = prefill.take()
                        && let Some(answer) = self.prefill_answer(call).await
                    {
                        progress.spans.prefill_answered(&answer);
                        prefill_cached = answer.cached_tokens;
                        guard.prefill = None;
                        kv_here = true;
                    }
                    // A request that ended at its first token, that token sent
                    // ahead of the KV: the other samples follow once the KV is
                    // known to be at the decode node.
                    if kv_here {
                        progress.placement.prompt_ready(&decode.addr);
                    }
                    progress.spans.decode_finished(finished.timings.as_ref());
                    // One of the two is zero: the prompt was prefilled either
                    // by the prefill node or by the decode node itself.
                    if let Some(usage) = finished.usage.as_mut() {
                        usage.cached_tokens = usage
                            .cached_tokens
                            .saturating_add(prefill_cached)
                            .min(usage.prompt_tokens);
                        progress.cached_tokens = usage.cached_tokens;
                    }
                    progress.finish = Some(finish_label(finished.reason));
                    return self.send_finished(finished, progress).await;
                }
                DecodeEvent::PromptLogprobs(p) => {
                    if !progress.prompt_logprobs_sent {
                        progress.prompt_logprobs_sent = true;
                        self.send(ClientEvent::PromptLogprobs(p)).await?;
                    }
                }
                DecodeEvent::Admitted(_) => {
                    return Err(self.protocol(&decode, "a second Admitted"));
                }
            }
        }
    }

    /// Sends a token chunk to the client and accounts for it; `kv_here`: the
    /// prompt's KV is in place at the decode node.
    async fn relay_token(
        &self,
        mut chunk: pb::TokenChunk,
        progress: &mut Progress,
        kv_here: bool,
    ) -> Result<(), RouterError> {
        if progress.sent.is_empty() {
            chunk.prompt_tokens = self.req.prompt.len() as u32;
        }
        let now = Instant::now();
        progress.first_token_at.get_or_insert(now);
        progress.clock.on_token(now);
        progress.sent.extend_from_slice(&chunk.ids);
        // The other samples can follow, reusing the prompt's KV there.
        if kv_here && let Some(node) = &progress.decode {
            progress.placement.prompt_ready(node);
        }
        self.send(ClientEvent::Token(chunk)).await
    }

    /// The answer (cached-token count, timings) of a prefill call still running when the
    /// request finished; `None` when it does not answer soon (the guard then
    /// cancels it) or failed (too late to matter: the tokens are delivered).
    async fn prefill_answer(&self, call: PrefillCall) -> Option<pb::PrefillResponse> {
        match tokio::time::timeout(PREFILL_ANSWER_WAIT, call).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(status)) => {
                debug!("prefill call failed after the request finished: {status}");
                None
            }
            Err(_) => {
                debug!("no prefill answer within {PREFILL_ANSWER_WAIT:?} of the finish");
                None
            }
        }
    }
}
