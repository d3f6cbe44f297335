//! Open connections per source address, so that one address cannot take every place
//! under `max_connections` (300 silent connections from one host kept everyone else
//! waiting). The source is the TCP peer, or, behind a trusted reverse proxy, the address
//! it reports (counted once the request head says it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The count per source; an entry exists only while its source has a connection open, so
/// the map is bounded by `max_connections`.
pub struct Sources {
    open: Mutex<HashMap<IpAddr, usize>>,
    /// 0: no limit. SIGHUP may change it: connections counted before stay counted.
    per_source: AtomicUsize,
}

/// One connection's place in its source's count; dropping it gives the place back.
pub struct SourcePlace {
    sources: Arc<Sources>,
    source: IpAddr,
}

impl Sources {
    pub fn new(per_source: usize) -> Arc<Sources> {
        Arc::new(Sources { open: Mutex::new(HashMap::new()), per_source: per_source.into() })
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Single increments and decrements: a poisoned map is still consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_limit(&self, per_source: usize) {
        self.per_source.store(per_source, Ordering::Relaxed);
    }

    /// Whether a limit is set; without one nothing is counted (no lock per connection).
    pub fn limited(&self) -> bool {
        self.per_source.load(Ordering::Relaxed) > 0
    }

    /// A place for one more connection from `source`, or None when it has its fill.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<SourcePlace> {
        let mut open = self.open();
        let count = open.entry(source).or_insert(0);
        let limit = self.per_source.load(Ordering::Relaxed);
        if limit > 0 && *count >= limit {
            if *count == 0 {
                open.remove(&source);
            }
            return None;
        }
        *count += 1;
        Some(SourcePlace { sources: self.clone(), source })
    }

    /// Sources with a connection open now.
    pub fn len(&self) -> usize {
        self.open().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        let mut open = self.sources.open();
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_share_and_gives_it_back() {
        let sources = Sources::new(2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let first = sources.admit(a).unwrap();
        let _second = sources.admit(a).unwrap();
        assert!(sources.admit(a).is_none(), "a third from the same source");
        assert!(sources.admit(b).is_some(), "another source is not held up");
        drop(first);
        assert!(sources.admit(a).is_some(), "a place given back is free again");
        assert_eq!(Sources::new(0).admit(a).map(|_| ()), Some(()), "0 means no limit");
    }

    #[test]
    fn sources_with_nothing_open_leave_no_entry() {
        let sources = Sources::new(1);
        let place = sources.admit("192.0.2.9".parse().unwrap()).unwrap();
        assert_eq!(sources.len(), 1);
        drop(place);
        assert!(sources.is_empty());
    }
}
