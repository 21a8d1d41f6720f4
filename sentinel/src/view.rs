//! The leader's view of the cluster's keys, kept from its watch: a full read of the prefix
//! once per sleepInterval (which also bounds how stale a silently stalled watch can make
//! it), and every watch event applied in between. A round decides on the view as it is, so
//! a burst of events (a thousand proxies acknowledging a generation) costs one read of each
//! changed key, not a read of every key per event.

use stolon_core::model::{decode, ClusterData, ModelError, Pause, SwitchoverRequest};
use stolon_core::sentinel::Observations;
use stolon_store::{ClusterStore, Event, EventKind, KeyValue, Range, StoreError, WatchUpdate};

/// The key names of one cluster.
pub struct Keys {
    clusterdata: String,
    keepers: String,
    proxies: String,
    switchover: String,
    pause: String,
}

impl Keys {
    pub fn new(store: &ClusterStore) -> Keys {
        Keys {
            clusterdata: store.clusterdata_key(),
            keepers: store.keepers_info_prefix(),
            proxies: store.proxies_info_prefix(),
            switchover: store.switchover_key(),
            pause: store.pause_key(),
        }
    }
}

/// One consistent state of the cluster's keys.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The clusterdata and its mod revision.
    pub cd: Option<(ClusterData, i64)>,
    pub obs: Observations,
    /// The store revision of the last full read: events at or before it are in the view.
    pub revision: i64,
}

impl View {
    /// The view of a full read. A clusterdata that cannot be read is an error: never
    /// decide (and overwrite) on a document that may hold the truth.
    pub fn from_range(keys: &Keys, range: Range) -> Result<View, StoreError> {
        let mut v = View {
            revision: range.revision,
            ..View::default()
        };
        for kv in &range.kvs {
            v.put(keys, kv)?;
        }
        Ok(v)
    }

    /// Applies one watch update; `Err` for an unreadable clusterdata (the caller reads
    /// again and refuses to decide while it stays so).
    pub fn apply(&mut self, keys: &Keys, update: WatchUpdate) -> Result<(), StoreError> {
        match update {
            WatchUpdate::Progress(_) => Ok(()),
            WatchUpdate::Resync(range) => {
                *self = View::from_range(keys, range)?;
                Ok(())
            }
            WatchUpdate::Events(events) => {
                for e in events {
                    self.event(keys, &e)?;
                }
                Ok(())
            }
        }
    }

    fn event(&mut self, keys: &Keys, e: &Event) -> Result<(), StoreError> {
        // Already in the view: the full read that made it was at a later revision.
        if e.kv.mod_revision <= self.revision {
            return Ok(());
        }
        match e.kind {
            EventKind::Put => self.put(keys, &e.kv),
            EventKind::Delete => {
                self.delete(keys, &e.kv.key);
                Ok(())
            }
        }
    }

    fn put(&mut self, keys: &Keys, kv: &KeyValue) -> Result<(), StoreError> {
        let bad = |e: ModelError| {
            tracing::error!(key = %kv.key, error = %e, "ignoring malformed document");
        };
        let obs = &mut self.obs;
        if kv.key == keys.clusterdata {
            let cd = ClusterData::from_json(&kv.value).map_err(|e| StoreError::Malformed {
                key: kv.key.clone(),
                reason: e.to_string(),
            })?;
            self.cd = Some((cd, kv.mod_revision));
        } else if let Some(uid) = kv.key.strip_prefix(&keys.keepers) {
            match decode("keeper info", &kv.value) {
                Ok(info) => drop(obs.keepers.insert(uid.to_string(), info)),
                Err(e) => {
                    bad(e);
                    obs.keepers.remove(uid);
                }
            }
        } else if let Some(uid) = kv.key.strip_prefix(&keys.proxies) {
            match decode("proxy info", &kv.value) {
                Ok(info) => drop(obs.proxies.insert(uid.to_string(), info)),
                Err(e) => {
                    bad(e);
                    obs.proxies.remove(uid);
                }
            }
        } else if kv.key == keys.pause {
            obs.pause = decode::<Pause>("pause", &kv.value).map_err(bad).ok();
        } else if kv.key == keys.switchover {
            obs.switchover = decode::<SwitchoverRequest>("switchover request", &kv.value)
                .map_err(bad)
                .ok();
        }
        Ok(())
    }

    fn delete(&mut self, keys: &Keys, key: &str) {
        let obs = &mut self.obs;
        if key == keys.clusterdata {
            self.cd = None;
        } else if let Some(uid) = key.strip_prefix(&keys.keepers) {
            obs.keepers.remove(uid);
        } else if let Some(uid) = key.strip_prefix(&keys.proxies) {
            obs.proxies.remove(uid);
        } else if key == keys.pause {
            obs.pause = None;
        } else if key == keys.switchover {
            obs.switchover = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use stolon_core::model::ProxyInfo;
    use stolon_store::mem::MemStore;

    fn keys() -> (ClusterStore, Keys) {
        let cs = ClusterStore::new(Arc::new(MemStore::new()), "stolon/cluster", "v");
        let k = Keys::new(&cs);
        (cs, k)
    }

    fn kv(key: String, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key,
            value: value.as_bytes().to_vec(),
            create_revision: rev,
            mod_revision: rev,
            lease: 0,
        }
    }

    fn put(key: String, value: &str, rev: i64) -> Event {
        Event {
            kind: EventKind::Put,
            kv: kv(key, value, rev),
        }
    }

    fn del(key: String, rev: i64) -> Event {
        Event {
            kind: EventKind::Delete,
            kv: kv(key, "", rev),
        }
    }

    fn proxy(generation: i64) -> String {
        serde_json::to_string(&ProxyInfo {
            uid: "p1".into(),
            generation,
            ..Default::default()
        })
        .expect("json")
    }

    /// Events older than the full read are in it already: replaying them must not undo a
    /// later delete or put; newer ones apply in order.
    #[test]
    fn events_apply_after_the_full_read_only() {
        let (cs, k) = keys();
        let p1 = format!("{}p1", cs.proxies_info_prefix());
        let range = Range {
            kvs: vec![kv(p1.clone(), &proxy(3), 9)],
            revision: 10,
        };
        let mut v = View::from_range(&k, range).expect("view");
        let stale = vec![put(p1.clone(), &proxy(1), 5), del(p1.clone(), 8)];
        v.apply(&k, WatchUpdate::Events(stale)).expect("apply");
        assert_eq!(v.obs.proxies["p1"].generation, 3, "a stale event applied");
        let fresh = vec![put(p1.clone(), &proxy(4), 11)];
        v.apply(&k, WatchUpdate::Events(fresh)).expect("apply");
        assert_eq!(v.obs.proxies["p1"].generation, 4);
        v.apply(&k, WatchUpdate::Events(vec![del(p1, 12)]))
            .expect("apply");
        assert!(
            v.obs.proxies.is_empty(),
            "an expired proxy lease stays in the view"
        );
    }

    /// A malformed info drops that component from the view (as the full read never lists
    /// it); a malformed clusterdata is an error, never a view without one.
    #[test]
    fn malformed_documents() {
        let (cs, k) = keys();
        let p1 = format!("{}p1", cs.proxies_info_prefix());
        let mut v = View::default();
        v.apply(&k, WatchUpdate::Events(vec![put(p1.clone(), &proxy(2), 1)]))
            .expect("apply");
        v.apply(&k, WatchUpdate::Events(vec![put(p1, "{not json", 2)]))
            .expect("a bad info is no error");
        assert!(v.obs.proxies.is_empty());
        let bad = vec![put(cs.clusterdata_key(), "{not json", 3)];
        assert!(matches!(
            v.apply(&k, WatchUpdate::Events(bad)),
            Err(StoreError::Malformed { .. })
        ));
    }
}
