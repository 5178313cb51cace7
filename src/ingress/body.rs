//! Request bodies: read while streaming under the size limit, the body timeout and the shared
//! byte budget ([`HeldBytes`]); a refused body is drained in the background, bounded.

use super::http::Reply;
use crate::ingress::source::Source;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The 413 reply. The rest of the body is drained (bounded in bytes and time, never kept)
/// before the connection closes, so the client reads the 413 instead of a reset.
pub(super) fn too_large(source: &Source, rest: Incoming) -> Reply {
    spawn_drain(rest, source.max_body_bytes);
    Reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the body exceeds this source's limit of {} bytes",
            source.max_body_bytes
        ),
    )
    .closing()
}

/// Reads and discards what is left of a refused body, so the client can read the answer.
pub(super) fn spawn_drain(rest: Incoming, max_body_bytes: usize) {
    tokio::spawn(drain(
        rest,
        (4 * max_body_bytes).max(1 << 20),
        Duration::from_secs(2),
    ));
}

pub(super) async fn drain(mut body: Incoming, max_bytes: usize, max_time: Duration) {
    let _ = tokio::time::timeout(max_time, async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > max_bytes {
                break;
            }
        }
    })
    .await;
}

/// Body bytes taken from the budget; given back (and taken off the gauge) on drop.
pub(super) struct HeldBytes {
    permit: Option<OwnedSemaphorePermit>,
    gauge: IntGauge,
}

impl HeldBytes {
    /// Bytes held.
    fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Takes `n` more bytes from the budget without waiting; `false` if it is spent.
    fn grow(&mut self, budget: BodyBudget<'_>, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let Ok(n32) = u32::try_from(n) else {
            return false;
        };
        let Ok(more) = budget.permits.clone().try_acquire_many_owned(n32) else {
            return false;
        };
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.gauge.add(n as i64);
        true
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        if let Some(p) = &self.permit {
            self.gauge.sub(p.num_permits() as i64);
        }
    }
}

/// Reads a whole body of at most `max` bytes within `timeout`, taking its bytes from
/// `budget` as they arrive.
pub(super) async fn read_body(
    mut body: Incoming,
    max: usize,
    timeout: Duration,
    budget: BodyBudget<'_>,
) -> Result<(Bytes, HeldBytes), BodyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut held = HeldBytes {
        permit: None,
        gauge: budget.gauge.clone(),
    };
    // A declared length (already checked ≤ max) is taken from the budget and allocated once;
    // a chunked body grows as it arrives. Either way the budget covers what is allocated.
    let declared = body.size_hint().exact().unwrap_or(0).min(max as u64) as usize;
    if !held.grow(budget, declared) {
        return Err(BodyError::Overloaded(body));
    }
    let mut buf = BytesMut::with_capacity(declared);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok((buf.freeze(), held)),
            Ok(Some(Err(e))) => return Err(BodyError::Broken(e)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let len = buf.len() + data.len();
            if len > max {
                return Err(BodyError::TooLarge(body));
            }
            if len > buf.capacity() {
                // Growth at least doubles, as BytesMut's would, and is charged before it
                // happens.
                let target = len.max(2 * buf.capacity()).min(max);
                if !held.grow(budget, target.saturating_sub(held.bytes())) {
                    return Err(BodyError::Overloaded(body));
                }
                buf.reserve(target - buf.len());
            }
            buf.extend_from_slice(data);
        }
    }
}

pub(super) enum BodyError {
    TooLarge(Incoming),
    Overloaded(Incoming),
    Timeout,
    Broken(hyper::Error),
}

/// The shared budget of body bytes held in memory, and its gauge.
#[derive(Clone, Copy)]
pub(super) struct BodyBudget<'a> {
    pub(super) permits: &'a Arc<Semaphore>,
    pub(super) gauge: &'a IntGauge,
}
