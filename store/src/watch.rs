//! A prefix watcher that survives broken streams and compactions: it resumes from the
//! revision after the last one delivered (so no event is lost or repeated), and when its
//! resume point was compacted it re-reads the whole prefix and says so.

use super::*;
use futures::StreamExt;
use std::sync::Arc;

/// What [`Watcher::next`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Changes, in revision order, each revision delivered exactly once.
    Events(Vec<Event>),
    /// The watcher missed history (compaction): this is the full current state; the caller
    /// must replace what it knows with it.
    Resync(Range),
    /// A progress notification: nothing changed up to this revision (proof of contact).
    Progress(i64),
}

pub struct Watcher {
    store: Arc<dyn Store>,
    prefix: String,
    /// The first revision not yet delivered.
    next_revision: i64,
    stream: Option<WatchStream>,
}

impl Watcher {
    /// Reads the current state under `prefix` and returns it with a watcher that continues
    /// right after it.
    pub async fn start(store: Arc<dyn Store>, prefix: impl Into<String>) -> Result<(Range, Self)> {
        let prefix = prefix.into();
        let range = store.get_prefix(&prefix).await?;
        let w = Watcher::from_revision(store, prefix, range.revision + 1);
        Ok((range, w))
    }

    /// A watcher that delivers events from `revision` on.
    pub fn from_revision(store: Arc<dyn Store>, prefix: impl Into<String>, revision: i64) -> Self {
        Watcher {
            store,
            prefix: prefix.into(),
            next_revision: revision,
            stream: None,
        }
    }

    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// The next update. A broken stream is reopened from the resume revision; an error is
    /// returned only when reopening fails (the store is unreachable) and the caller may
    /// call again to retry.
    pub async fn next(&mut self) -> Result<WatchUpdate> {
        loop {
            let stream = match &mut self.stream {
                Some(s) => s,
                None => {
                    let s = self
                        .store
                        .watch_prefix(&self.prefix, self.next_revision)
                        .await?;
                    self.stream.insert(s)
                }
            };
            match stream.next().await {
                Some(Ok(batch)) => {
                    if let Some(update) = self.accept(batch) {
                        return Ok(update);
                    }
                }
                Some(Err(StoreError::Compacted { .. })) => {
                    self.stream = None;
                    let range = self.store.get_prefix(&self.prefix).await?;
                    self.next_revision = range.revision + 1;
                    return Ok(WatchUpdate::Resync(range));
                }
                Some(Err(e)) => {
                    self.stream = None;
                    tracing::debug!(error = %e, resume = self.next_revision, "watch stream broke; resuming");
                }
                None => {
                    self.stream = None;
                    // A stream that ended cleanly may just be a restarted server: reopen,
                    // but report an error if that fails so the caller sees the outage.
                    let s = self
                        .store
                        .watch_prefix(&self.prefix, self.next_revision)
                        .await?;
                    self.stream = Some(s);
                }
            }
        }
    }

    /// Drops events already delivered (a resumed stream may repeat a revision) and advances
    /// the resume point.
    fn accept(&mut self, batch: WatchBatch) -> Option<WatchUpdate> {
        let was_progress = batch.events.is_empty();
        let fresh: Vec<Event> = batch
            .events
            .into_iter()
            .filter(|e| e.kv.mod_revision >= self.next_revision)
            .collect();
        if let Some(last) = fresh.last() {
            self.next_revision = last.kv.mod_revision + 1;
            return Some(WatchUpdate::Events(fresh));
        }
        if !was_progress {
            // Only repeats of what was delivered: nothing to report.
            return None;
        }
        if batch.header_revision >= self.next_revision {
            // etcd sends progress only to a caught-up watcher: nothing under the prefix
            // changed up to the header revision.
            self.next_revision = batch.header_revision + 1;
        }
        Some(WatchUpdate::Progress(batch.header_revision))
    }
}
