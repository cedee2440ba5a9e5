//! Responses a node writes itself: generated errors (with the mark an upper adds so its lower
//! knows who failed), the data-listener health and readiness check, and an upper's answer to
//! a lower's authenticated `PURGE`.

use bytes::Bytes;
use http::header;
use pingora_cache::key::CacheHashKey;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use stratus_tiering::{Blame, ControlContext, Party, RequestLine, Symptom};

use super::admission::{context_refusal, control_header};
use super::context::{Ctx, RequestContext};
use super::Proxy;
use crate::cache_status;
use crate::config::Role;
use crate::errors::{Generated, GENERATED_HEADER};
use crate::policy;
use crate::tier::HEALTH_PATH;

impl Proxy {
    /// Answers the data-listener health check without contacting an origin. On an upper, a
    /// probe carrying a control context is a readiness check: the context must verify as a
    /// request's would (secret, clock, recipient, replay), else 403 naming why.
    pub(super) async fn answer_health(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let readiness = match (self.config().node.role, self.tier.as_deref()) {
            (Role::Upper, Some(tier)) => match control_header(session.req_header()) {
                Ok(None) => Ok(()),
                Ok(Some(value)) => {
                    let line = RequestLine {
                        method: "GET",
                        target: HEALTH_PATH,
                    };
                    let accepted = tier
                        .accept(Some(value), line, false, std::time::SystemTime::now())
                        .map(|_| ())
                        .map_err(context_refusal);
                    // A lower's probe: counted apart from client traffic (only a verified
                    // context makes one; anyone else's is a client request).
                    ctx.progress.verified_probe = accepted.is_ok();
                    accepted
                }
                Err(g) => Err(g),
            },
            _ => Ok(()),
        };
        // A lower whose members all come from DNS is not ready before a name has answered:
        // every miss would be refused (a load balancer must wait, as for a cold start).
        let no_member_yet = self
            .lower_tier()
            .is_some_and(|tier| tier.view().members().is_empty());
        match readiness {
            Ok(()) if no_member_yet => {
                let body = Bytes::from_static(b"no upper member yet\n");
                write_local(session, 503, "text/plain", body, &[]).await
            }
            Ok(()) => {
                write_local(session, 200, "text/plain", Bytes::from_static(b"ok\n"), &[]).await
            }
            Err(g) => self.respond(session, ctx, g).await,
        }
    }

    /// Answers `PURGE` from a lower node (already authenticated by its context).
    pub(super) async fn purge_from_lower(
        &self,
        session: &mut Session,
        r: &RequestContext,
    ) -> Result<()> {
        let purged = self
            .store
            .purge_primary(policy::cache_key(&r.host, &r.path_and_query).primary_bin());
        let body = Bytes::from(format!(
            "{{\"node\": \"{}\", \"outcome\": \"{}\"}}\n",
            self.config().node.name,
            if purged { "purged" } else { "not_found" }
        ));
        write_local(session, 200, "application/json", body, &[]).await
    }

    /// Writes a generated response with its short body and `Cache-Status` detail; an upper
    /// adds its mark saying who failed.
    pub(super) async fn respond(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        g: Generated,
    ) -> Result<()> {
        let mut extra = vec![(
            "cache-status",
            cache_status::generated(&self.config().node.name, g),
        )];
        if let Some(mark) = self.mark(session, ctx, g) {
            extra.push((GENERATED_HEADER, mark));
        }
        // A generated error ends the connection, and says so (`Connection: close`): after a
        // 400/431 the framing of what follows cannot be trusted, and a lower must not pool a
        // connection the upper is about to close.
        session.set_keepalive(None);
        let body = Bytes::from(g.body());
        write_local(
            session,
            g.status(),
            "text/plain; charset=utf-8",
            body,
            &extra,
        )
        .await
    }

    /// An upper's `stratus-generated` value for `g`: signed against the request's context
    /// when its signature verifies (even if it was refused for its age, recipient or a
    /// replay), so the lower can trust who is blamed. Without one (a wrong secret), unsigned.
    fn mark(&self, session: &Session, ctx: &Ctx, g: Generated) -> Option<String> {
        let tier = self.tier.as_deref()?;
        if self.config().node.role != Role::Upper {
            return None;
        }
        let received = ctx.request.as_ref().and_then(|r| r.received.clone());
        let control = received.or_else(|| {
            let req = session.req_header();
            let value = control_header(req).ok()??;
            let target = std::str::from_utf8(req.raw_path()).ok()?;
            let line = RequestLine {
                method: req.method.as_str(),
                target,
            };
            ControlContext::verify(value, &tier.keys(), line).ok()
        });
        // The failure decision's verdict, when there was one, says who failed better than the
        // status alone (a 504 after a client stalled its body is the client's).
        let blame = match ctx.progress.failure {
            Some((_, v)) if v.blame == Party::Client => Blame::Request,
            Some((_, v)) if v.blame == Party::Origin => Blame::Origin,
            Some((_, v)) if v.blame == Party::Member => Blame::Member,
            // This node broke: the member is at fault. Otherwise "this node" is its pooled
            // connection to the origin going stale: the origin side, never the member.
            Some((f, v)) if v.blame == Party::Node && f.symptom == Symptom::Internal => {
                Blame::Member
            }
            Some((_, v)) if v.blame == Party::Node => Blame::Origin,
            _ => g.blame(),
        };
        Some(match control {
            Some(c) => c.mark(&tier.keys(), blame, g.detail()),
            None => format!("{}; {}", blame.as_str(), g.detail()),
        })
    }
}

/// Writes a small, complete response stratus answers itself: exact length, never stored.
pub(super) async fn write_local(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header(header::CONTENT_TYPE, content_type)?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    h.insert_header(header::CACHE_CONTROL, "no-store")?;
    for (name, value) in extra {
        h.insert_header(*name, value.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
