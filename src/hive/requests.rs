//! The hive's table of in-flight requests: which stage each is in and how much of its budget is
//! left. An entry lives exactly as long as its `Tracked` guard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::deadline::Budget;
use crate::protocol::{RequestInfo, RequestStage};

#[derive(Default)]
pub(crate) struct Requests {
    table: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    model: String,
    stage: RequestStage,
    received: Instant,
    budget: Budget,
    cancel: Arc<Cancel>,
}

/// An operator's cancel of one request (`rbee worker cancel`): the token the request's stages
/// wait on, and the key id of who cancelled, for its audit record.
#[derive(Default)]
pub(crate) struct Cancel {
    pub(crate) token: CancellationToken,
    by: OnceLock<String>,
}

impl Cancel {
    /// Who cancelled the request, once someone has.
    pub(crate) fn by(&self) -> Option<&str> {
        self.by.get().map(String::as_str)
    }
}

/// Removes its request from the table when dropped, however the request ended.
pub(crate) struct Tracked {
    requests: Arc<Requests>,
    id: String,
    pub(crate) cancel: Arc<Cancel>,
}

impl Requests {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Plain data: a panic elsewhere cannot leave it inconsistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn track(self: &Arc<Self>, id: &str, model: &str, budget: Budget) -> Tracked {
        let cancel = Arc::new(Cancel::default());
        self.lock().insert(
            id.to_string(),
            Entry {
                model: model.to_string(),
                stage: RequestStage::Queued,
                received: Instant::now(),
                budget,
                cancel: cancel.clone(),
            },
        );
        Tracked {
            requests: self.clone(),
            id: id.to_string(),
            cancel,
        }
    }

    /// Cancels the request `id` on behalf of the key `by`: its stages end it at once. `None`
    /// when no such request is in flight (it never was, or it has ended).
    pub(crate) fn cancel(&self, id: &str, by: &str) -> Option<RequestInfo> {
        let table = self.lock();
        let entry = table.get(id)?;
        // The first canceller is the one on record; a second cancel changes nothing.
        let _ = entry.cancel.by.set(by.to_string());
        entry.cancel.token.cancel();
        Some(info(id, entry))
    }

    pub(crate) fn list(&self) -> Vec<RequestInfo> {
        let mut list: Vec<RequestInfo> = self.lock().iter().map(|(id, e)| info(id, e)).collect();
        list.sort_by_key(|r| std::cmp::Reverse(r.age_ms));
        list
    }
}

impl Tracked {
    pub(crate) fn stage(&self, stage: RequestStage) {
        if let Some(e) = self.requests.lock().get_mut(&self.id) {
            e.stage = stage;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.requests.lock().remove(&self.id);
    }
}

fn info(id: &str, e: &Entry) -> RequestInfo {
    RequestInfo {
        request_id: id.to_string(),
        model: e.model.clone(),
        stage: e.stage,
        age_ms: millis(e.received.elapsed()),
        remaining_ms: millis(e.budget.remaining()),
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_entry_lives_as_long_as_its_guard() {
        let requests = Arc::new(Requests::default());
        let guard = requests.track("r1", "m", Budget::new(Duration::from_secs(10)));
        guard.stage(RequestStage::Generating);
        let list = requests.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].stage, RequestStage::Generating);
        assert!(list[0].remaining_ms > 9_000 && list[0].remaining_ms <= 10_000);
        assert!(requests.cancel("r2", "k").is_none());
        assert!(requests.cancel("r1", "k1").is_some());
        assert!(requests.cancel("r1", "k2").is_some());
        assert!(guard.cancel.token.is_cancelled());
        assert_eq!(guard.cancel.by(), Some("k1"));
        drop(guard);
        assert!(requests.list().is_empty());
        assert!(requests.cancel("r1", "k").is_none());
    }
}
