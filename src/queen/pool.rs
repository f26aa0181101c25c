//! Connections kept open between requests, one per node: `rbee serve` keeps them for as long as
//! it runs, `rbee batch` for the length of the batch. A request takes the kept connection as it
//! is when its hive was seen running over it; otherwise the request brings it up as `infer`
//! does (open it, start the hive), one request at a time per node, so that requests arriving
//! together open one connection between them. A connection whose SSH session is gone is
//! dropped, and the next request or watch round opens another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

use crate::config::Node;
use crate::deadline::Budget;
use crate::error::Result;
use crate::queen::node::{ConnectOptions, NodeConn};

#[derive(Default)]
pub(crate) struct Pool {
    nodes: Mutex<HashMap<String, Arc<Kept>>>,
}

#[derive(Default)]
struct Kept {
    /// The connection, and whether its hive was seen running over it since it last failed.
    conn: Mutex<Option<(Arc<NodeConn>, bool)>>,
    /// Held while the connection is opened, its hive started, or its hive asked how it is.
    busy: Arc<tokio::sync::Mutex<()>>,
}

impl Kept {
    fn get(&self) -> Option<(Arc<NodeConn>, bool)> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, value: Option<(Arc<NodeConn>, bool)>) {
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = value;
    }

    /// Sets whether the hive runs, if `conn` is still the one kept.
    fn mark(&self, conn: &Arc<NodeConn>, running: bool) {
        let mut kept = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((c, r)) = kept.as_mut()
            && Arc::ptr_eq(c, conn)
        {
            *r = running;
        }
    }

    /// Drops `conn` if it is still the one kept.
    fn forget(&self, conn: &Arc<NodeConn>) {
        let mut kept = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, conn)) {
            *kept = None;
        }
    }
}

/// The kept connection of a node, held against every other use but requests already on it:
/// what a watcher asks the hive over.
pub(crate) struct Held {
    kept: Arc<Kept>,
    pub(crate) conn: Arc<NodeConn>,
    _busy: OwnedMutexGuard<()>,
}

impl Held {
    /// What the watcher saw: whether the hive answered over the connection.
    pub(crate) fn seen(&self, running: bool) {
        self.kept.mark(&self.conn, running);
    }

    /// The watcher's question failed: the connection is dropped when its session is gone.
    pub(crate) async fn failed(self) {
        failed(&self.kept, &self.conn).await;
    }
}

impl Pool {
    fn kept(&self, node: &str) -> Arc<Kept> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(node.to_string())
            .or_default()
            .clone()
    }

    /// The kept connection of `node`, when its hive was seen running over it.
    pub(crate) fn running(&self, node: &str) -> Option<Arc<NodeConn>> {
        match self.kept(node).get() {
            Some((conn, true)) => Some(conn),
            _ => None,
        }
    }

    /// A connection over which `node`'s hive runs, made by `bring` (which opens one, or takes
    /// the kept one whose hive was not seen running, and starts the hive): one caller at a time
    /// per node, and a caller that waited for another takes what that one brought up.
    pub(crate) async fn bring_up<F, Fut>(&self, node: &str, bring: F) -> Result<Arc<NodeConn>>
    where
        F: FnOnce(Option<NodeConn>) -> Fut,
        Fut: std::future::Future<Output = Result<NodeConn>>,
    {
        let kept = self.kept(node);
        let _busy = kept.busy.clone().lock_owned().await;
        let old = match kept.get() {
            Some((conn, true)) => return Ok(conn),
            Some((conn, false)) => {
                kept.set(None);
                // Requests still on it keep it; this one opens its own.
                Arc::try_unwrap(conn).ok().filter(|c| !c.is_closed())
            }
            None => None,
        };
        let conn = Arc::new(bring(old).await?);
        kept.set(Some((conn.clone(), true)));
        Ok(conn)
    }

    /// The kept connection of `node`, opened when there is none (its hive is not started), held
    /// until the `Held` is dropped.
    pub(crate) async fn hold(
        &self,
        node: &Node,
        budget: &Budget,
        options: ConnectOptions,
    ) -> Result<Held> {
        let kept = self.kept(&node.name);
        let busy = kept.busy.clone().lock_owned().await;
        let conn = match kept.get() {
            Some((conn, _)) if !conn.is_closed() => conn,
            _ => {
                let conn = Arc::new(NodeConn::open(node, budget, options).await?);
                kept.set(Some((conn.clone(), false)));
                conn
            }
        };
        Ok(Held {
            kept,
            conn,
            _busy: busy,
        })
    }

    /// A request over `conn` failed on the way to the hive: the connection is dropped when its
    /// session is gone; either way the next request brings the hive up first.
    pub(crate) async fn failed(&self, node: &str, conn: &Arc<NodeConn>) {
        failed(&self.kept(node), conn).await;
    }
}

async fn failed(kept: &Kept, conn: &Arc<NodeConn>) {
    if conn.lost().await.is_some() {
        kept.forget(conn);
    } else {
        kept.mark(conn, false);
    }
}
