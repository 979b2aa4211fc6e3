//! The proxy's indexed view of the mesh, fed by the xDS client: workloads,
//! services and L4 authorization policies, looked up by the data path on
//! every connection. Readers take a shared lock and clone `Arc`s out, so
//! lookups never wait for the network; writers apply whole xDS deltas under
//! the write lock and then bump a generation counter (a `tokio::sync::watch`)
//! that wakes anyone waiting for a resource (on-demand lookups, readiness).
//!
//!
//! On demand, every lookup also refreshes the last use of the demanded
//! name it hits (`network/IP`, `namespace/hostname`, uid), so the xDS client
//! can drop subscriptions idle for longer than its idle timeout
//! ([`Store::idle_demands`], [`Store::drop_demands`]).
//!
//! Submodules: `types` (domain types, config-dump serialization),
//! `convert` (proto → domain conversion with validation), `index` (the
//! indexes) and `demand` (the on-demand names and their last use).

pub mod convert;
mod demand;
mod index;
pub mod types;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

pub use types::*;

use index::Indexes;

/// Default bound on how long an on-demand lookup waits for the control plane.
pub const DEFAULT_DEMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the control plane for resources the store does not hold yet. The
/// xDS client implements it (on-demand mode); in wildcard mode there is no
/// demander because the store already holds everything the server has.
pub trait Demand: Send + Sync + 'static {
    /// Adds Address resource names (`network/IP`, `namespace/hostname` or a
    /// workload uid) to the subscription. Idempotent; must not block.
    fn subscribe(&self, names: Vec<String>);
}

/// Why an on-demand lookup gave up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    #[error("no answer from the control plane for {name} within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
}

/// One incremental change, already converted and validated. Names in the
/// `removed_*` lists are xDS resource names (or, for addresses, aliases
/// such as `network/IP`); removing an unknown name is not an error (it is
/// how the server answers "no such resource" to an on-demand request).
#[derive(Clone, Debug, Default)]
pub struct StoreUpdate {
    pub addresses: Vec<Address>,
    pub removed_addresses: Vec<String>,
    pub policies: Vec<Policy>,
    pub removed_policies: Vec<String>,
    /// Names and aliases of Address resources the server sent but this proxy
    /// rejected: nothing is applied for them, but on-demand waiters on those
    /// names get a negative answer now instead of a timeout.
    pub rejected_addresses: Vec<String>,
}

impl StoreUpdate {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.removed_addresses.is_empty()
            && self.policies.is_empty()
            && self.removed_policies.is_empty()
            && self.rejected_addresses.is_empty()
    }
}

/// Object counts, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
}

/// Serializable snapshot in ztunnel's `config_dump` shape. The admin module
/// flattens it next to `certificates` (which the identity module owns).
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreDump {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Arc<Policy>>,
}

/// The store. Cheap to share as `Arc<Store>`; all methods take `&self`.
pub struct Store {
    inner: RwLock<Indexes>,
    generation: watch::Sender<u64>,
    demand: RwLock<Option<Arc<dyn Demand>>>,
    demand_timeout: Duration,
    /// Origin of the last-use times of demanded names.
    epoch: Instant,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// An empty store with the default on-demand timeout.
    pub fn new() -> Self {
        Store::with_demand_timeout(DEFAULT_DEMAND_TIMEOUT)
    }

    /// An empty store whose on-demand lookups wait at most `timeout`.
    pub fn with_demand_timeout(timeout: Duration) -> Self {
        Store {
            inner: RwLock::new(Indexes::default()),
            generation: watch::channel(0).0,
            demand: RwLock::new(None),
            demand_timeout: timeout,
            epoch: Instant::now(),
        }
    }

    /// Milliseconds since the store was created (last-use clock).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Refreshes the last use of demanded `network/ip` (no-op in wildcard
    /// mode, where nothing is demanded).
    fn touch_ip(&self, idx: &Indexes, network: &str, ip: IpAddr) {
        if !idx.demanded.is_empty() {
            idx.demanded.touch_ip(network, ip, self.now_ms());
        }
    }

    fn touch_name(&self, idx: &Indexes, name: &str) {
        if !idx.demanded.is_empty() {
            idx.demanded.touch_name(name, self.now_ms());
        }
    }

    /// Installs the on-demand subscriber (the xDS client in on-demand mode).
    pub fn set_demand(&self, demand: Arc<dyn Demand>) {
        *self.demand.write().unwrap_or_else(|e| e.into_inner()) = Some(demand);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Indexes> {
        // A panic while holding the lock cannot leave the indexes half
        // updated in a way readers care about more than an outage would.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one converted delta atomically (readers see all of it or none)
    /// and wakes waiters. Returns the new generation.
    pub fn apply(&self, update: StoreUpdate) -> u64 {
        {
            let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
            for name in &update.removed_addresses {
                idx.remove_address(name);
            }
            for name in &update.rejected_addresses {
                idx.mark_absent(name);
            }
            for name in &update.removed_policies {
                idx.remove_policy(name);
            }
            for address in update.addresses {
                idx.insert_address(address);
            }
            for policy in update.policies {
                idx.insert_policy(policy);
            }
        }
        let mut next = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            next = *g;
        });
        next
    }

    /// A receiver whose value (the generation) changes after every apply.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Current generation (number of applies so far).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits until `pred` holds on the store or `timeout` passes; returns
    /// whether it held. Re-evaluated after every apply.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Store) -> bool) -> bool {
        let mut rx = self.changes();
        let wait = async {
            loop {
                if pred(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The sender lives in `self`, so this cannot happen while
                    // we borrow it; park instead of spinning.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// The workload owning `ip` on `network`.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        let idx = self.read();
        self.touch_ip(&idx, network, ip);
        idx.workload_by_addr(network, ip)
    }

    /// The workload with resource name (uid) `uid`.
    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.read().workloads.get(uid).cloned()
    }

    /// The service with VIP `ip` on `network`.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<Arc<Service>> {
        let idx = self.read();
        self.touch_ip(&idx, network, ip);
        idx.service_by_vip(network, ip)
    }

    /// The service `namespace/hostname`.
    pub fn service_by_hostname(&self, namespace: &str, hostname: &str) -> Option<Arc<Service>> {
        let idx = self.read();
        let key = format!("{namespace}/{hostname}");
        self.touch_name(&idx, &key);
        idx.services.get(&key).cloned()
    }

    /// Services whose hostname is exactly `hostname` (a wildcard host such
    /// as `*.example.com` only under that literal name), in any namespace,
    /// ordered by `namespace/hostname`. Counts as a use of each.
    pub fn services_by_host(&self, hostname: &str) -> Vec<Arc<Service>> {
        let idx = self.read();
        let found = idx.services_by_host(hostname);
        for s in &found {
            self.touch_name(&idx, &s.key());
        }
        found
    }

    /// Whether an on-demand subscriber is installed (on-demand xDS mode).
    pub fn on_demand(&self) -> bool {
        self.demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Workload IP first, then service VIP (as ztunnel resolves destinations).
    pub fn lookup_address(&self, network: &str, ip: IpAddr) -> Option<Address> {
        let idx = self.read();
        self.touch_ip(&idx, network, ip);
        idx.workload_by_addr(network, ip)
            .map(Address::Workload)
            .or_else(|| idx.service_by_vip(network, ip).map(Address::Service))
    }

    /// Resolves an Address resource name or alias: a workload uid,
    /// `namespace/hostname`, or `network/IP`.
    pub fn lookup_name(&self, name: &str) -> Option<Address> {
        let idx = self.read();
        self.touch_name(&idx, name);
        idx.lookup_name(name)
    }

    /// Whether Address resource name or alias `name` resolves, without
    /// counting as a use of it (bookkeeping, not traffic).
    pub fn has_address(&self, name: &str) -> bool {
        self.read().lookup_name(name).is_some()
    }

    /// Workloads backing `service` (those whose `services` map names it),
    /// ordered by uid.
    pub fn service_endpoints(&self, service: &Service) -> Vec<Arc<Workload>> {
        self.read().endpoints_of(&service.key())
    }

    /// The policy `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<Arc<Policy>> {
        self.read().policies.get(key).cloned()
    }

    /// Policies applying to `workload`: global ones, those of its namespace,
    /// and the selector-scoped ones it lists in `authorization_policies`
    /// (each once, ordered by `namespace/name`).
    pub fn policies_for(&self, workload: &Workload) -> Vec<Arc<Policy>> {
        self.read().policies_for(workload)
    }

    /// Object counts.
    pub fn stats(&self) -> StoreStats {
        let idx = self.read();
        StoreStats {
            workloads: idx.workloads.len(),
            services: idx.services.len(),
            policies: idx.policies.len(),
        }
    }

    /// Everything, sorted by key, for the admin config dump.
    pub fn dump(&self) -> StoreDump {
        let idx = self.read();
        StoreDump {
            workloads: sorted_values(&idx.workloads),
            services: sorted_values(&idx.services),
            policies: sorted_values(&idx.policies),
        }
    }

    /// Resolves `network/IP`, asking the control plane on a miss (on-demand
    /// mode) and waiting at most the store's demand timeout. `Ok(None)` is a
    /// negative answer (the server said there is no such address), or a miss
    /// in wildcard mode, where the store already holds everything.
    pub async fn fetch_on_demand(
        &self,
        network: &str,
        ip: IpAddr,
    ) -> Result<Option<Address>, FetchError> {
        self.fetch_name(&NetworkAddr::new(network, ip).to_string())
            .await
    }

    /// Like [`Store::fetch_on_demand`] for any Address resource name: a
    /// workload uid, `namespace/hostname` (a service; its endpoints arrive
    /// with it) or `network/IP`.
    pub async fn fetch_name(&self, name: &str) -> Result<Option<Address>, FetchError> {
        // Subscribe to changes before the first look so no apply is missed.
        let mut rx = self.changes();
        if let Some(found) = self.lookup_name(name) {
            return Ok(Some(found));
        }
        let Some(demand) = self
            .demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(None);
        };
        {
            let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if idx.absent.contains(name) {
                return Ok(None);
            }
            let now = self.now_ms();
            idx.demanded.insert(name, now);
        }
        demand.subscribe(vec![name.to_string()]);
        let wait = async {
            loop {
                {
                    let idx = self.read();
                    if let Some(found) = idx.lookup_name(name) {
                        return Some(found);
                    }
                    if idx.absent.contains(name) {
                        return None;
                    }
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(self.demand_timeout, wait)
            .await
            .map_err(|_| FetchError::Timeout {
                name: name.to_string(),
                timeout: self.demand_timeout,
            })
    }

    /// Forgets on-demand names (after unsubscribing them): they no longer
    /// count as demanded and their negative answers are dropped. Resources
    /// already held stay until removed by the caller's update.
    pub fn undemand(&self, names: &[String]) {
        let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for n in names {
            idx.demanded.remove(n);
            idx.absent.remove(n);
        }
    }

    /// Names requested on demand so far (the on-demand subscription), sorted.
    pub fn demanded_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().demanded.names().cloned().collect();
        v.sort();
        v
    }

    /// Demanded names not used (looked up or fetched) for `max_idle`, sorted.
    pub fn idle_demands(&self, max_idle: Duration) -> Vec<String> {
        let cutoff = self
            .now_ms()
            .saturating_sub(max_idle.as_millis().try_into().unwrap_or(u64::MAX));
        self.read().demanded.idle_since(cutoff)
    }

    /// Forgets the demanded `names` and removes from the store what only
    /// they stand for: what they resolve to (a workload, or a service and
    /// its endpoints) unless a name in `keep` (the remaining subscription,
    /// pinned names included) resolves to it too. Returns the canonical
    /// names removed, sorted, which the caller unsubscribes along with
    /// `names` (the server follows them too: resolution is sticky).
    pub fn drop_demands(&self, names: &[String], keep: &[String]) -> Vec<String> {
        let removed = {
            let mut idx = self.inner.write().unwrap_or_else(|e| e.into_inner());
            let mut kept = BTreeSet::new();
            for n in keep {
                idx.coverage(n, &mut kept);
            }
            let mut dropped = BTreeSet::new();
            for n in names {
                idx.coverage(n, &mut dropped);
                idx.demanded.remove(n);
                idx.absent.remove(n);
            }
            let removed: Vec<String> = dropped.difference(&kept).cloned().collect();
            for n in &removed {
                idx.remove_address(n);
            }
            removed
        };
        self.generation.send_modify(|g| *g += 1);
        removed
    }
}

/// Values of `m` ordered by key.
fn sorted_values<T>(m: &HashMap<String, Arc<T>>) -> Vec<Arc<T>> {
    let mut v: Vec<(&String, &Arc<T>)> = m.iter().collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v.into_iter().map(|(_, x)| Arc::clone(x)).collect()
}

#[cfg(test)]
mod tests;
