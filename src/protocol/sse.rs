//! Server-sent events: the reader that turns the bytes of a `text/event-stream` body into
//! events (the hive reads its workers with it and the CLI reads its hive, checking each event's
//! signature when the client asked for that), and the writer's event helpers.

use axum::response::sse::Event;
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::error::Error;

/// Refuse an event larger than this rather than buffer without bound.
pub(crate) const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub(crate) event: String,
    pub(crate) data: String,
    /// The event's `id` field: a hive's signature of the event (see `auth::proof`).
    pub(crate) id: Option<String>,
}

impl SseEvent {
    /// An event named `name` carrying `data` as JSON.
    pub(crate) fn json(name: &str, data: &impl Serialize) -> SseEvent {
        let (event, data) = match serde_json::to_string(data) {
            Ok(json) => (name.to_string(), json),
            // Our event types serialize infallibly; if one ever does not, the client sees why.
            Err(e) => (
                "error".to_string(),
                serde_json::json!({"code": "internal", "message": format!("cannot encode event: {e}")})
                    .to_string(),
            ),
        };
        SseEvent {
            event,
            data,
            id: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

impl SseParser {
    /// Feeds bytes, returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, Error> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line)
                .map_err(|_| Error::internal("event stream carried invalid UTF-8"))?;
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
        }
        let pending = self.buf.len() + self.data.iter().map(String::len).sum::<usize>();
        if pending > MAX_EVENT_BYTES {
            return Err(Error::internal(format!(
                "event stream sent an event over {MAX_EVENT_BYTES} bytes"
            )));
        }
        Ok(events)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_none() {
                return None;
            }
            // Each event's id is its own signature: it does not carry over to the next one.
            let event = SseEvent {
                event: self.event.take().unwrap_or_else(|| "message".to_string()),
                data: std::mem::take(&mut self.data).join("\n"),
                id: self.id.take(),
            };
            return Some(event);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_string()),
            "data" => self.data.push(value.to_string()),
            "id" => self.id = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

/// Why an event stream could not be read to its end: callers tell a peer that went away from
/// one that sent something that is not an event stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The connection ended before the body did: the peer died, or the way to it broke.
    #[error("the connection broke: {0}")]
    Broke(String),
    /// The body is not a well-formed event stream.
    #[error(transparent)]
    Malformed(Error),
}

/// Put on a response by the client that made the request: every event of its body must carry
/// the signature that follows in this chain, or the stream ends there with an `Unauthenticated`
/// error. `peer` names who was to sign it, for the message.
#[derive(Clone)]
pub(crate) struct Proven {
    pub(crate) chain: crate::auth::EventChain,
    pub(crate) peer: String,
}

/// Events of an HTTP response body, in order; ends when the body ends. When the response
/// carries `Proven`, each event is yielded only once its signature verified; the first that
/// does not ends the stream with an `Unauthenticated` error, so nothing of it is shown.
pub(crate) fn events(
    mut response: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, StreamError>> {
    let proven = response.extensions_mut().remove::<Proven>();
    let body = response.bytes_stream();
    futures::stream::unfold(
        (
            body,
            SseParser::default(),
            std::collections::VecDeque::<SseEvent>::new(),
            proven,
            false,
        ),
        |(mut body, mut parser, mut ready, mut proven, refused)| async move {
            if refused {
                return None;
            }
            loop {
                if let Some(event) = ready.pop_front() {
                    if let Some(p) = proven.as_mut()
                        && let Err(why) =
                            p.chain
                                .verify(&event.event, &event.data, event.id.as_deref())
                    {
                        let err = Error::of_kind(
                            crate::error::ExitKind::Unauthenticated,
                            format!(
                                "the answer of {} did not verify as the node's: {}; nothing of \
                                 it from there on was shown",
                                p.peer,
                                why.explain()
                            ),
                        );
                        return Some((
                            Err(StreamError::Malformed(err)),
                            (body, parser, ready, proven, true),
                        ));
                    }
                    return Some((Ok(event), (body, parser, ready, proven, false)));
                }
                match body.next().await {
                    None => return None,
                    Some(Err(e)) => {
                        let err = StreamError::Broke(crate::error::root_cause(&e));
                        return Some((Err(err), (body, parser, ready, proven, false)));
                    }
                    Some(Ok(bytes)) => match parser.push(&bytes) {
                        Ok(events) => ready.extend(events),
                        Err(e) => {
                            return Some((
                                Err(StreamError::Malformed(e)),
                                (body, parser, ready, proven, false),
                            ));
                        }
                    },
                }
            }
        },
    )
}

/// The wire form of `event`, with `id` (its signature) when there is one.
pub(crate) fn to_wire(event: SseEvent) -> Event {
    let wire = Event::default().event(event.event).data(event.data);
    match event.id {
        Some(id) => wire.id(id),
        None => wire,
    }
}

/// An SSE event named `name` carrying `data` as JSON.
pub(crate) fn sse_event(name: &str, data: &impl Serialize) -> Event {
    match serde_json::to_string(data) {
        Ok(json) => Event::default().event(name).data(json),
        // Our event types serialize infallibly; if one ever does not, the client sees why.
        Err(e) => Event::default().event("error").data(
            serde_json::json!({"code": "internal", "message": format!("cannot encode event: {e}")})
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: tok").expect("ok").is_empty());
        assert!(
            p.push(b"en\ndata: {\"text\":\"a\"}\n")
                .expect("ok")
                .is_empty()
        );
        let events = p.push(b"\nevent: done\r\ndata: x\r\n\r\n").expect("ok");
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: "token".into(),
                    data: "{\"text\":\"a\"}".into(),
                    id: None,
                },
                SseEvent {
                    event: "done".into(),
                    data: "x".into(),
                    id: None,
                },
            ]
        );
    }

    #[test]
    fn comments_multiline_data_and_default_event() {
        let mut p = SseParser::default();
        let events = p.push(b": keep-alive\n\ndata: a\ndata: b\n\n").expect("ok");
        assert_eq!(
            events,
            vec![SseEvent {
                event: "message".into(),
                data: "a\nb".into(),
                id: None,
            }]
        );
    }

    #[test]
    fn an_id_belongs_to_its_own_event_only() {
        let mut p = SseParser::default();
        let events = p
            .push(b"event: token\nid: ab12\ndata: x\n\nevent: token\ndata: y\n\n")
            .expect("ok");
        assert_eq!(events[0].id.as_deref(), Some("ab12"));
        assert_eq!(events[1].id, None);
    }

    #[test]
    fn oversized_event_is_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big).is_err());
    }
}
