//! Where each attempt goes, what it carries, and what follows when it fails.
//!
//! The route comes from `stratus-tiering` once per request; each attempt to an upper member
//! gets a fresh control context addressed to that member. Every upstream failure becomes a
//! [`Failure`] and the one decision [`stratus_tiering::decide`] says who is blamed, what the
//! member's health hears and whether the next hop is tried; this file only gathers the facts
//! and carries the verdict out.

use std::time::{Duration, Instant};

use http::header;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use stratus_tiering::{
    decide, route, Blame, Failure, HopKind, Outcome, Party, RequestLine, Stage, Symptom, Verdict,
};
use stratus_tracing::UpstreamKind;

use super::admission::CDN_LOOP_TOKEN;
use super::context::{Attempt, Ctx, Hop};
use super::{internal, Proxy};
use crate::config::AllUpperDown;
use crate::errors::{ALL_UPPER_DOWN, DNS_FAILED, GENERATED_HEADER, UPPER_REFUSED};
use crate::tier::{Tier, CONTROL_HEADER, MAX_UPPER_ATTEMPTS};

impl Proxy {
    /// The tier of a lower node that routes misses to upper members.
    pub(super) fn lower_tier(&self) -> Option<&Tier> {
        self.tier
            .as_deref()
            .filter(|t| self.config().node.role == crate::config::Role::Lower && t.has_upper())
    }

    /// Whether another upstream attempt is possible after the current one. Without upper
    /// members the origin may be asked once more (only ever for a stale pooled connection:
    /// [`decide`] allows nothing else there).
    fn has_next_hop(&self, ctx: &Ctx) -> bool {
        let p = &ctx.progress;
        let Some(tier) = self.lower_tier() else {
            return p.origin_attempts() < 2;
        };
        let route_left = p
            .route
            .as_ref()
            .is_some_and(|r| r.len() > p.members_tried());
        route_left
            || (tier.settings().on_all_upper_down == AllUpperDown::Origin
                && p.origin_attempts() == 0)
    }

    /// Chooses the next hop and records the attempt: the next untried member on the route
    /// (with a fresh context for it), else the origin when policy allows.
    pub(super) fn next_hop(&self, ctx: &mut Ctx) -> Result<Hop> {
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream without context"))?;
        ctx.progress.upstream_status = None;
        ctx.progress.marked = None;
        if let Some(tier) = self.lower_tier() {
            if let (true, Some(Hop::Upper(addr))) = (
                std::mem::take(&mut ctx.progress.resend_same),
                ctx.progress.current_hop(),
            ) {
                ctx.progress.resends += 1;
                let context = r
                    .identity(&self.config().node.name)
                    .map(|i| tier.issue(&i, addr));
                let hop = Hop::Upper(addr);
                ctx.progress.attempts.push(Attempt {
                    hop,
                    started: Instant::now(),
                    context,
                });
                return Ok(hop);
            }
            let tried = ctx.progress.members_tried();
            let route = ctx.progress.route.get_or_insert_with(|| {
                let view = tier.view();
                let hops = route(r.primary_key.as_bytes(), &view, MAX_UPPER_ATTEMPTS).hops;
                let members = view.members();
                hops.iter()
                    .filter_map(|&id| members.get(id).map(|m| m.addr))
                    .collect()
            });
            if let Some(&addr) = route.get(tried) {
                let context = r
                    .identity(&self.config().node.name)
                    .map(|i| tier.issue(&i, addr));
                let hop = Hop::Upper(addr);
                ctx.progress.attempts.push(Attempt {
                    hop,
                    started: Instant::now(),
                    context,
                });
                return Ok(hop);
            }
            let go_direct = tier.settings().on_all_upper_down == AllUpperDown::Origin
                && ctx.progress.origin_attempts() == 0;
            if !go_direct {
                return Err(upstream_error(
                    ALL_UPPER_DOWN,
                    format!("no upper member left after {tried} attempts"),
                    false,
                ));
            }
        }
        ctx.progress.attempts.push(Attempt {
            hop: Hop::Origin,
            started: Instant::now(),
            context: None,
        });
        Ok(Hop::Origin)
    }

    /// The peer for `hop`, with its timeouts; starts the attempt's CLIENT span.
    pub(super) async fn peer_for(&self, hop: Hop, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        if let (Hop::Upper(addr), Some(tier)) = (hop, self.tier.as_deref()) {
            self.start_attempt(
                ctx,
                UpstreamKind::Upper,
                &addr.ip().to_string(),
                addr.port(),
            );
            let mut peer = match tier.tls() {
                None => HttpPeer::new(addr, false, String::new()),
                Some(tls) => {
                    let (name, known) = tier.upper_server_name(addr);
                    let mut peer = HttpPeer::new(addr, true, name);
                    let (ca, cert_key) = tls.peer_material();
                    peer.options.ca = Some(ca);
                    peer.options.verify_hostname = known;
                    peer.client_cert_key = Some(cert_key);
                    peer
                }
            };
            let settings = tier.settings();
            peer.options.connection_timeout = Some(settings.connect_timeout);
            peer.options.read_timeout = Some(settings.read_timeout);
            return Ok(Box::new(peer));
        }
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream without context"))?;
        let config = ctx
            .config
            .clone()
            .unwrap_or_else(|| self.config.load_full());
        let origin = config
            .origins
            .get(r.origin)
            .ok_or_else(|| internal("origin index out of range"))?;
        let host = r.host.clone();
        let port = origin
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(80);
        self.start_attempt(ctx, UpstreamKind::Origin, &host, port);
        // The lookup spends the connect timeout; the connect gets what is left of it.
        let dns = self.dns.load_full();
        let (addr, connect_left) = match dns.resolve(&origin.address, origin.connect_timeout).await
        {
            Ok(resolved) => resolved,
            Err(e) => {
                self.trace_failed_attempt(ctx, "dns", false);
                return Err(Error::create(
                    ErrorType::Custom(DNS_FAILED),
                    ErrorSource::Upstream,
                    Some(e.to_string().into()),
                    None,
                ));
            }
        };
        let mut peer = HttpPeer::new(addr, origin.tls, host);
        peer.options.connection_timeout = Some(connect_left.max(Duration::from_millis(1)));
        peer.options.read_timeout = Some(origin.read_timeout);
        self.metrics.origin_requests.inc();
        Ok(Box::new(peer))
    }

    /// Fails an attempt on a connection (new or pooled) to an upper whose certificate the CRLs
    /// in force revoke, as a failed handshake: the member is blamed and the next one tried.
    pub(super) fn check_upper_certificate(
        &self,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &Ctx,
    ) -> Result<()> {
        let to_upper = ctx
            .progress
            .attempts
            .last()
            .is_some_and(|a| matches!(a.hop, Hop::Upper(..)));
        let Some(tls) = self
            .tier
            .as_deref()
            .and_then(|t| t.tls())
            .filter(|_| to_upper)
        else {
            return Ok(());
        };
        let serial = digest
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|s| s.serial_number.as_deref());
        if tls.upper_revoked(serial) {
            return Err(Error::create(
                ErrorType::TLSHandshakeFailure,
                ErrorSource::Upstream,
                Some("the upper's certificate is revoked".into()),
                None,
            ));
        }
        Ok(())
    }

    /// The one place the outgoing request is written, from the frozen context: the key's own
    /// Host and target (so what is fetched is what the key names), the forwarding fields (a
    /// lower's own, never a client's), `CDN-Loop`, this attempt's control context (to an
    /// upper), and the trace headers of this attempt.
    pub(super) fn write_upstream_request(
        &self,
        upstream: &mut RequestHeader,
        ctx: &Ctx,
        client: Option<std::net::IpAddr>,
    ) -> Result<()> {
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream request without context"))?;
        upstream.remove_header(CONTROL_HEADER);
        upstream.remove_header(GENERATED_HEADER);
        let target = http::Uri::try_from(r.path_and_query.as_str())
            .map_err(|_| internal("admitted target does not parse"))?;
        upstream.set_uri(target);
        upstream.insert_header(header::HOST, r.host.as_str())?;
        if self.config().node.role == crate::config::Role::Lower {
            // What a client says about where it came from never travels on (it is not keyed).
            for name in crate::policy::FORWARDING_FIELDS {
                upstream.remove_header(name);
            }
            for (name, value) in crate::policy::forwarding_fields(client, &r.host) {
                upstream.insert_header(name, value)?;
            }
        }
        upstream.append_header("cdn-loop", CDN_LOOP_TOKEN)?;
        let attempt = ctx.progress.attempts.last();
        if let (Some(tier), Some(control)) = (&self.tier, attempt.and_then(|a| a.context.as_ref()))
        {
            // Signed over what is actually sent, so the two can never differ.
            let sent = upstream.uri.path_and_query().map_or("/", |p| p.as_str());
            let line = RequestLine {
                method: upstream.method.as_str(),
                target: sent,
            };
            upstream.insert_header(CONTROL_HEADER, control.encode(tier.keys().signing(), line))?;
        }
        // Tracing contributes only these pairs (none when it is off); they replace the
        // caller's traceparent/tracestate so the next hop's parent is our CLIENT span.
        if let Some(attempt) = &ctx.trace.attempt {
            for (name, value) in attempt.headers() {
                upstream.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    /// Response headers arrived. Control headers never pass on (an origin's
    /// `stratus-generated` least of all); an upper's verified account of an error it
    /// generated about itself turns the answer into a member failure.
    pub(super) fn upstream_answered(
        &self,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream.remove_header(CONTROL_HEADER);
        crate::policy::strip_hop_by_hop(upstream);
        let status = upstream.status.as_u16();
        if (100..200).contains(&status) && status != 101 {
            // An interim answer (100 Continue, 103): the final one follows and is the attempt's.
            upstream.remove_header(GENERATED_HEADER);
            return Ok(());
        }
        crate::policy::ensure_date(upstream);
        let mark = upstream
            .headers
            .get(GENERATED_HEADER)
            .map(|v| v.to_str().unwrap_or("").to_string());
        upstream.remove_header(GENERATED_HEADER);
        if let (Some(tier), Some(attempt)) = (&self.tier, ctx.progress.attempts.last()) {
            if matches!(attempt.hop, Hop::Upper(..)) {
                // A mark that does not verify came from the member all the same (uppers strip
                // origins' marks): a member that cannot sign is a broken member.
                let blame = mark.map(|m| {
                    attempt
                        .context
                        .as_ref()
                        .and_then(|c| c.read_mark(&tier.keys(), &m))
                        .map_or(Blame::Member, |mark| mark.blame)
                });
                if blame == Some(Blame::Member) {
                    ctx.progress.marked = blame;
                    return Err(upstream_error(
                        UPPER_REFUSED,
                        format!("upper member answered {status} about itself"),
                        false,
                    ));
                }
                self.report(ctx, Outcome::Answered);
            }
        }
        ctx.progress.upstream_status = Some(status);
        self.time_attempt(ctx);
        if status == 304 {
            ctx.progress.not_modified = Some(crate::policy::freshening_fields(upstream));
        }
        if let Some(attempt) = ctx.trace.attempt.take() {
            attempt.answered(status);
        }
        Ok(())
    }

    /// An upstream attempt failed at `stage`: asks the one decision who is to blame, tells
    /// health only about a member at fault, and returns whether to try the next hop.
    pub(super) fn upstream_failed(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: &Error,
        stage: Stage,
        stale_pooled: bool,
    ) -> Verdict {
        let hop = match ctx.progress.current_hop() {
            Some(Hop::Upper(..)) => HopKind::Upper,
            _ => HopKind::Origin,
        };
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        // A stale pooled connection to a member may be replaced once by a fresh one to it.
        let resend_possible = stale_pooled && hop == HopKind::Upper && ctx.progress.resends == 0;
        let failure = Failure {
            hop,
            stage,
            symptom: symptom_of(e, ctx.progress.marked),
            headers_sent: session.response_written().is_some(),
            reused_connection: stale_pooled,
            replayable,
            hops_left: resend_possible || self.has_next_hop(ctx),
        };
        if ctx.progress.upstream_status.is_none() {
            // Not timed yet: the attempt ends here, without headers.
            self.time_attempt(ctx);
        }
        let verdict = decide(&failure);
        ctx.progress.resend_same = resend_possible && verdict.retry && verdict.blame == Party::Node;
        ctx.progress.failure = Some((failure, verdict));
        if let Some(outcome) = verdict.health {
            self.report(ctx, outcome);
        }
        self.trace_failed_attempt(ctx, super::error_type(e), verdict.retry);
        verdict
    }

    /// Observes the current attempt in `stratus_upstream_duration_seconds`: from its start to
    /// its response header, or to its failure before one.
    fn time_attempt(&self, ctx: &Ctx) {
        if let Some(attempt) = ctx.progress.attempts.last() {
            let hop = match attempt.hop {
                Hop::Upper(_) => "upper",
                Hop::Origin => "origin",
            };
            self.metrics
                .upstream_duration
                .with_label_values(&[hop])
                .observe(attempt.started.elapsed().as_secs_f64());
        }
    }

    /// Reports the current attempt's outcome if it went to an upper member.
    fn report(&self, ctx: &Ctx, outcome: Outcome) {
        let Some(attempt) = ctx.progress.attempts.last() else {
            return;
        };
        if let (Some(tier), Hop::Upper(addr)) = (&self.tier, attempt.hop) {
            tier.report(addr, outcome, attempt.started);
            self.metrics
                .upper_requests
                .with_label_values(&[addr.to_string().as_str(), outcome.label()])
                .inc();
        }
    }
}

/// How far an attempt got when an error ended it (connect failures are reported apart).
pub(super) fn stage_of(session: &mut Session, ctx: &Ctx) -> Stage {
    if ctx.progress.upstream_status.is_some() {
        Stage::ReadBody
    } else if !session.downstream_session.is_body_done() {
        Stage::RelayRequestBody
    } else {
        Stage::AwaitHeaders
    }
}

/// What a Pingora error says happened.
fn symptom_of(e: &Error, marked: Option<Blame>) -> Symptom {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, Custom(UPPER_REFUSED)) => Symptom::Marked(marked.unwrap_or(Blame::Member)),
        (ErrorSource::Downstream, _) => Symptom::ClientGone,
        (ErrorSource::Internal, _) | (_, Custom(ALL_UPPER_DOWN)) => Symptom::Internal,
        (_, ConnectTimedout | ReadTimedout | WriteTimedout) => Symptom::TimedOut,
        (_, ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure) => {
            Symptom::ConnectFailed
        }
        (_, Custom(DNS_FAILED)) => Symptom::ConnectFailed,
        (_, InvalidHTTPHeader | H1Error | H2Error | InvalidH2) => Symptom::InvalidResponse,
        _ => Symptom::Reset,
    }
}

fn upstream_error(kind: &'static str, context: String, retry: bool) -> Box<Error> {
    let mut e = Error::create(
        ErrorType::Custom(kind),
        ErrorSource::Upstream,
        Some(context.into()),
        None,
    );
    e.set_retry(retry);
    e
}
