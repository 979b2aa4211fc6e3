//! The on-demand subscription as the store sees it: every name asked for
//! on demand, with the time it was last used, so the xDS client can drop
//! subscriptions nobody used for a while. Times are milliseconds since the
//! store's creation, kept in atomics: the data path refreshes them while
//! holding only the store's read lock, and an IP lookup finds its
//! `network/IP` name without formatting a string.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::types::NetworkAddr;

type Slot = Arc<AtomicU64>;

#[derive(Default)]
pub(super) struct DemandLog {
    names: HashMap<String, Slot>,
    /// The `network/IP` names among `names`, by IP.
    by_ip: HashMap<IpAddr, Vec<(String, Slot)>>,
}

impl DemandLog {
    /// Records `name` as demanded and used at `now`.
    pub fn insert(&mut self, name: &str, now: u64) {
        if let Some(slot) = self.names.get(name) {
            slot.store(now, Ordering::Relaxed);
            return;
        }
        let slot = Arc::new(AtomicU64::new(now));
        if let Some(key) = NetworkAddr::parse(name) {
            self.by_ip
                .entry(key.address)
                .or_default()
                .push((key.network, Arc::clone(&slot)));
        }
        self.names.insert(name.to_string(), slot);
    }

    pub fn remove(&mut self, name: &str) {
        if self.names.remove(name).is_none() {
            return;
        }
        if let Some(key) = NetworkAddr::parse(name)
            && let Some(v) = self.by_ip.get_mut(&key.address)
        {
            v.retain(|(n, _)| *n != key.network);
            if v.is_empty() {
                self.by_ip.remove(&key.address);
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Marks `name` used at `now` if it is demanded.
    pub fn touch_name(&self, name: &str, now: u64) {
        if let Some(slot) = self.names.get(name) {
            slot.store(now, Ordering::Relaxed);
        }
    }

    /// Marks `network/ip` used at `now` if it is demanded.
    pub fn touch_ip(&self, network: &str, ip: IpAddr, now: u64) {
        if let Some(v) = self.by_ip.get(&ip) {
            for (n, slot) in v {
                if n == network {
                    slot.store(now, Ordering::Relaxed);
                }
            }
        }
    }

    /// Names last used before `cutoff`, sorted.
    pub fn idle_since(&self, cutoff: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .names
            .iter()
            .filter(|(_, slot)| slot.load(Ordering::Relaxed) < cutoff)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_by_ip_and_name_refreshes_only_that_name() {
        let mut d = DemandLog::default();
        d.insert("/10.0.0.1", 0);
        d.insert("net2/10.0.0.1", 0);
        d.insert("ns/a.ns.svc.cluster.local", 0);
        d.touch_ip("", "10.0.0.1".parse().unwrap(), 50);
        assert_eq!(
            d.idle_since(10),
            ["net2/10.0.0.1", "ns/a.ns.svc.cluster.local"]
        );
        d.touch_name("ns/a.ns.svc.cluster.local", 60);
        d.touch_name("unknown", 60);
        assert_eq!(d.idle_since(10), ["net2/10.0.0.1"]);
        d.remove("net2/10.0.0.1");
        assert!(d.idle_since(10).is_empty());
        d.touch_ip("net2", "10.0.0.1".parse().unwrap(), 70);
        assert!(!d.contains("net2/10.0.0.1"));
        assert_eq!(d.idle_since(100).len(), 2);
        // Re-demanding refreshes instead of duplicating.
        d.insert("/10.0.0.1", 200);
        assert_eq!(d.idle_since(100), ["ns/a.ns.svc.cluster.local"]);
        assert_eq!(d.names().count(), 2);
    }
}
