//! The one place that turns a failure stratus itself answers into an HTTP status, a short
//! plain-text body and a `Cache-Status` detail.
//!
//! Every generated response in INTERFACE.md ("Errors that stratus itself generates") comes from
//! [`Generated`]; proxy phases only decide *which* failure happened.

use pingora_error::{Error, ErrorSource, ErrorType};
use stratus_tiering::Blame;

/// A response stratus writes itself instead of proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// 400: the request is malformed (bad or missing Host, several Host fields).
    BadRequest(&'static str),
    /// 403: an upper node refused the control context; the detail says why.
    Forbidden(&'static str),
    /// 408: the client stopped sending its request body; nobody upstream is to blame.
    ClientTimeout,
    /// 405: a method stratus refuses from clients (`PURGE`: use the admin API).
    MethodNotAllowed,
    /// 421: no `[[origin]]` serves this Host.
    UnknownHost,
    /// 431: the request line and headers exceed `node.max_request_header_size`.
    HeadersTooLarge,
    /// 502: the upstream could not be reached or answered nonsense; the detail says which.
    BadGateway(&'static str),
    /// 504: the upstream timed out; the detail says where.
    GatewayTimeout(&'static str),
    /// 508: the request has passed through stratus too many times.
    LoopDetected,
}

impl Generated {
    /// The status code.
    pub fn status(self) -> u16 {
        match self {
            Generated::BadRequest(_) => 400,
            Generated::Forbidden(_) => 403,
            Generated::MethodNotAllowed => 405,
            Generated::ClientTimeout => 408,
            Generated::UnknownHost => 421,
            Generated::HeadersTooLarge => 431,
            Generated::BadGateway(_) => 502,
            Generated::GatewayTimeout(_) => 504,
            Generated::LoopDetected => 508,
        }
    }

    /// The `Cache-Status` `detail` value: a short token naming the reason.
    pub fn detail(self) -> &'static str {
        match self {
            Generated::BadRequest(d)
            | Generated::Forbidden(d)
            | Generated::BadGateway(d)
            | Generated::GatewayTimeout(d) => d,
            Generated::UnknownHost => "unknown-host",
            Generated::MethodNotAllowed => "method-not-allowed",
            Generated::ClientTimeout => "client-body-timeout",
            Generated::HeadersTooLarge => "headers-too-large",
            Generated::LoopDetected => "loop",
        }
    }

    /// Who an upper node says is to blame when it answers this itself: the lower decides
    /// member health from it (an origin's failure or a client's loop never counts).
    pub fn blame(self) -> Blame {
        match self {
            Generated::BadGateway(_) | Generated::GatewayTimeout(_) => Blame::Origin,
            Generated::Forbidden(_) => Blame::Member,
            // The Host is the client's: an upper that serves no such host (a lower reloaded
            // with a new origin before the uppers were) is not broken, and no client may mark
            // a member down by choosing a Host.
            Generated::UnknownHost
            | Generated::BadRequest(_)
            | Generated::MethodNotAllowed
            | Generated::ClientTimeout
            | Generated::HeadersTooLarge
            | Generated::LoopDetected => Blame::Request,
        }
    }

    /// The short plain-text body.
    pub fn body(self) -> String {
        let what = match self {
            Generated::BadRequest(_) => "bad request",
            Generated::Forbidden(_) => "forbidden",
            Generated::MethodNotAllowed => "method not allowed; purge through the admin API",
            Generated::ClientTimeout => "request body timed out",
            Generated::UnknownHost => "no origin is configured for this host",
            Generated::HeadersTooLarge => "request headers too large",
            Generated::BadGateway(_) => "bad gateway",
            Generated::GatewayTimeout(_) => "gateway timeout",
            Generated::LoopDetected => "forwarding loop detected",
        };
        format!("{} {what} ({})\n", self.status(), self.detail())
    }

    /// Classifies a pingora error that ended a proxied request. `None`: the client is gone,
    /// nothing can be written.
    pub fn from_proxy_error(e: &Error) -> Option<Generated> {
        use ErrorType::*;
        if let HTTPStatus(code) = e.etype() {
            return Some(match code {
                504 => Generated::GatewayTimeout("upstream-timeout"),
                400..=499 => Generated::BadRequest("bad-request"),
                _ => Generated::BadGateway("upstream-error"),
            });
        }
        match e.esource() {
            ErrorSource::Downstream => match e.etype() {
                WriteError | ReadError | ConnectionClosed => None,
                _ => Some(Generated::BadRequest("bad-request")),
            },
            ErrorSource::Upstream | ErrorSource::Internal | ErrorSource::Unset => {
                Some(match e.etype() {
                    ConnectTimedout => Generated::GatewayTimeout("connect-timeout"),
                    ReadTimedout | WriteTimedout => Generated::GatewayTimeout("read-timeout"),
                    ConnectRefused => Generated::BadGateway("connection-refused"),
                    ConnectNoRoute => Generated::BadGateway("no-route"),
                    ConnectionClosed | ConnectError | ReadError | WriteError
                    | TLSHandshakeFailure => Generated::BadGateway("connection-reset"),
                    InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => {
                        Generated::BadGateway("invalid-response")
                    }
                    Custom(UPPER_REFUSED) => Generated::BadGateway("upper-refused"),
                    Custom(DNS_FAILED) => Generated::BadGateway("dns-failed"),
                    Custom(ALL_UPPER_DOWN) => Generated::BadGateway("all-upper-down"),
                    _ => Generated::BadGateway("upstream-error"),
                })
            }
        }
    }
}

/// The custom error type for a failed origin name lookup.
pub const DNS_FAILED: &str = "DNSFailed";
/// The custom error type for a lower node with no upper member left to try.
pub const ALL_UPPER_DOWN: &str = "AllUpperDown";
/// The custom error type for an upper member that answered with an error about itself.
pub const UPPER_REFUSED: &str = "UpperRefused";
/// Response header an upper node puts on responses it generated itself: who failed and why,
/// authenticated against the request's control context (see `ControlContext::mark`). Upper
/// nodes remove it from origin responses and lower nodes remove it before clients, so it
/// only ever travels from an upper to a lower.
pub const GENERATED_HEADER: &str = "stratus-generated";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_failures_say_which() {
        let refused = Error::new_up(ErrorType::ConnectRefused);
        assert_eq!(
            Generated::from_proxy_error(&refused),
            Some(Generated::BadGateway("connection-refused"))
        );
        let dns = Error::new_up(ErrorType::Custom(DNS_FAILED));
        assert_eq!(
            Generated::from_proxy_error(&dns).map(|g| g.detail()),
            Some("dns-failed")
        );
        let slow = Error::new_up(ErrorType::ReadTimedout);
        assert_eq!(
            Generated::from_proxy_error(&slow).map(|g| g.status()),
            Some(504)
        );
        let gone = Error::new_down(ErrorType::WriteError);
        assert_eq!(Generated::from_proxy_error(&gone), None);
    }

    #[test]
    fn nothing_a_client_chooses_blames_a_member() {
        for g in [
            Generated::UnknownHost,
            Generated::BadRequest("bad-host"),
            Generated::LoopDetected,
            Generated::ClientTimeout,
            Generated::HeadersTooLarge,
            Generated::MethodNotAllowed,
        ] {
            assert_eq!(g.blame(), Blame::Request, "{g:?}");
        }
    }

    #[test]
    fn bodies_are_short_and_name_the_reason() {
        for g in [
            Generated::BadRequest("bad-host"),
            Generated::UnknownHost,
            Generated::HeadersTooLarge,
            Generated::BadGateway("dns-failed"),
            Generated::GatewayTimeout("read-timeout"),
            Generated::LoopDetected,
        ] {
            let body = g.body();
            assert!(body.len() < 100 && body.contains(g.detail()), "{body}");
            assert!(body.starts_with(&g.status().to_string()));
        }
    }
}
