//! Which standby runs a read-only session, by its cancel key, so a CancelRequest on the
//! read-only listener goes to that one server instead of every standby of the pool.
//!
//! The key is the body of the server's BackendKeyData ('K': process ID and secret key,
//! "Message Formats" in the protocol docs; the secret is 4 bytes up to protocol 3.1 and up
//! to 256 bytes from 3.2), sent once after authentication. A CancelRequest carries the same
//! bytes after its code (ibid.: length, 80877102, process ID, secret). A session whose
//! stream the proxy cannot read (TLS end to end) never shows its key: a cancel for a key
//! the proxy does not know goes to every standby, as before (PostgreSQL ignores a key it
//! did not issue).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The longest BackendKeyData body: a 4-byte process ID and a secret of at most 256 bytes.
const MAX_KEY: usize = 4 + 256;

/// Reads a server's message stream from its start until its BackendKeyData, or gives up
/// (ReadyForQuery without one, a message that cannot be one, an unreadable stream).
#[derive(Clone, Debug, Default)]
pub struct KeySniffer {
    header: Vec<u8>,
    kind: u8,
    body_left: usize,
    key: Vec<u8>,
    done: bool,
}

impl KeySniffer {
    /// True once the key was found or cannot be: nothing more to feed.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Feeds the server's next bytes; the key once complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<Vec<u8>> {
        while !bytes.is_empty() && !self.done {
            if self.body_left == 0 {
                let take = (5 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() < 5 {
                    return None;
                }
                let h = &self.header;
                self.kind = h[0];
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                self.header.clear();
                self.body_left = len.saturating_sub(4);
                match self.kind {
                    b'K' if (8..=MAX_KEY).contains(&self.body_left) => {}
                    b'K' | b'Z' => self.done = true,
                    _ if len < 4 => self.done = true,
                    _ => {}
                }
                continue;
            }
            let take = self.body_left.min(bytes.len());
            if self.kind == b'K' {
                self.key.extend_from_slice(&bytes[..take]);
            }
            self.body_left -= take;
            bytes = &bytes[take..];
            if self.kind == b'K' && self.body_left == 0 {
                self.done = true;
                return Some(std::mem::take(&mut self.key));
            }
        }
        None
    }
}

/// The key of a CancelRequest packet (what follows its length and code).
pub fn request_key(packet: &[u8]) -> Option<&[u8]> {
    packet.get(8..).filter(|k| (8..=MAX_KEY).contains(&k.len()))
}

/// Cancel keys of the read-only listener's live sessions, and the standby each runs on.
#[derive(Default)]
pub struct Keys(Mutex<HashMap<Vec<u8>, Arc<str>>>);

impl Keys {
    /// Records `key` on `addr` until the returned guard is dropped (the session's end).
    pub fn register(self: &Arc<Self>, key: Vec<u8>, addr: Arc<str>) -> KeyGuard {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key.clone(), addr);
        }
        KeyGuard {
            keys: self.clone(),
            key,
        }
    }

    /// The standby that runs the session with this key, if the proxy saw it.
    pub fn lookup(&self, key: &[u8]) -> Option<Arc<str>> {
        self.0.lock().ok()?.get(key).cloned()
    }
}

/// Removes its key when the session ends: a later cancel with it reaches nothing.
pub struct KeyGuard {
    keys: Arc<Keys>,
    key: Vec<u8>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.keys.0.lock() {
            m.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend(((body.len() + 4) as u32).to_be_bytes());
        v.extend(body);
        v
    }

    /// A startup answer as PostgreSQL sends it after authentication.
    fn answer(key: &[u8]) -> Vec<u8> {
        let mut v = msg(b'R', &[0, 0, 0, 0]);
        v.extend(msg(b'S', b"server_version\x0015\x00"));
        v.extend(msg(b'K', key));
        v.extend(msg(b'Z', b"I"));
        v
    }

    #[test]
    fn the_key_is_found_in_any_split_of_the_stream() {
        for key in [vec![0, 0, 0, 7, 1, 2, 3, 4], (0..36u8).collect::<Vec<u8>>()] {
            let stream = answer(&key);
            for cut in 0..=stream.len() {
                for cut2 in cut..=stream.len() {
                    let mut s = KeySniffer::default();
                    let found: Vec<Vec<u8>> = [&stream[..cut], &stream[cut..cut2], &stream[cut2..]]
                        .iter()
                        .filter_map(|part| s.feed(part))
                        .collect();
                    assert_eq!(found, vec![key.clone()], "cuts {cut} {cut2}");
                    assert!(s.done());
                }
            }
        }
    }

    #[test]
    fn it_gives_up_at_ready_for_query_or_on_nonsense() {
        let mut s = KeySniffer::default();
        let mut v = msg(b'R', &[0, 0, 0, 0]);
        v.extend(msg(b'Z', b"I"));
        assert_eq!(s.feed(&v), None);
        assert!(s.done());
        let mut s = KeySniffer::default();
        assert_eq!(s.feed(&msg(b'K', &[1, 2, 3])), None, "too short for a key");
        assert!(s.done());
        let mut s = KeySniffer::default();
        assert_eq!(
            s.feed(&[0x16, 3, 1, 0, 200]),
            None,
            "TLS: waits, finds nothing"
        );
    }

    #[test]
    fn a_cancel_requests_key_is_what_follows_its_code() {
        let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        p.extend([0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(request_key(&p), Some(&[0, 0, 0, 7, 1, 2, 3, 4][..]));
        assert_eq!(request_key(&p[..12]), None);
    }

    #[test]
    fn a_key_is_known_while_its_session_lives() {
        let keys = Arc::new(Keys::default());
        let guard = keys.register(vec![1; 8], "10.0.0.1:5432".into());
        assert_eq!(keys.lookup(&[1; 8]).as_deref(), Some("10.0.0.1:5432"));
        drop(guard);
        assert_eq!(keys.lookup(&[1; 8]), None);
    }
}
