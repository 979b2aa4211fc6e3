//! The indexes behind [`super::Store`], mutated only under its write lock.
//! Every insert first removes the previous version of the same resource so
//! stale secondary keys (old IPs, old endpoint memberships) never linger.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::demand::DemandLog;
use super::types::*;

#[derive(Default)]
pub(super) struct Indexes {
    /// uid → workload.
    pub workloads: HashMap<String, Arc<Workload>>,
    /// IP → workloads on it (by network).
    workload_addrs: AddrIndex<Workload>,
    /// `ns/hostname` → service.
    pub services: HashMap<String, Arc<Service>>,
    /// VIP → services on it (by network).
    service_vips: AddrIndex<Service>,
    /// hostname → `ns/hostname` keys of the services with that hostname
    /// (one per namespace: a Service and ServiceEntries may share a host).
    hosts: HashMap<String, BTreeSet<String>>,
    /// `ns/hostname` → uids of workloads backing it (the service need not be
    /// known yet: endpoints may arrive first).
    endpoints: HashMap<String, BTreeSet<String>>,
    /// `ns/name` → policy.
    pub policies: HashMap<String, Arc<Policy>>,
    /// Keys of `Global`-scoped policies.
    global_policies: BTreeSet<String>,
    /// namespace → keys of its `Namespace`-scoped policies.
    namespace_policies: HashMap<String, BTreeSet<String>>,
    /// Names requested on demand, with their last use.
    pub demanded: DemandLog,
    /// Demanded names the server answered "does not exist" for; cleared when
    /// a resource with that name or alias arrives.
    pub absent: HashSet<String>,
}

impl Indexes {
    pub fn workload_by_addr(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_addrs.get(network, ip)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<Arc<Service>> {
        self.service_vips.get(network, ip)
    }

    /// Services named `hostname`, in any namespace, ordered by key.
    pub fn services_by_host(&self, hostname: &str) -> Vec<Arc<Service>> {
        self.hosts
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| self.services.get(k).cloned())
            .collect()
    }

    pub fn lookup_name(&self, name: &str) -> Option<Address> {
        if let Some(w) = self.workloads.get(name) {
            return Some(Address::Workload(w.clone()));
        }
        if let Some(s) = self.services.get(name) {
            return Some(Address::Service(s.clone()));
        }
        let key = NetworkAddr::parse(name)?;
        self.workload_by_addr(&key.network, key.address)
            .map(Address::Workload)
            .or_else(|| {
                self.service_by_vip(&key.network, key.address)
                    .map(Address::Service)
            })
    }

    /// Canonical names of what Address name `name` stands for in the
    /// store: a workload's uid, or a service's key and its endpoints' uids.
    pub fn coverage(&self, name: &str, out: &mut BTreeSet<String>) {
        match self.lookup_name(name) {
            Some(Address::Workload(w)) => {
                out.insert(w.uid.clone());
            }
            Some(Address::Service(s)) => {
                let key = s.key();
                out.extend(self.endpoints.get(&key).into_iter().flatten().cloned());
                out.insert(key);
            }
            None => {}
        }
    }

    pub fn endpoints_of(&self, service_key: &str) -> Vec<Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.workloads.get(uid).cloned())
            .collect()
    }

    pub fn policies_for(&self, workload: &Workload) -> Vec<Arc<Policy>> {
        let mut keys: BTreeSet<&str> = self.global_policies.iter().map(String::as_str).collect();
        if let Some(ns) = self.namespace_policies.get(&workload.namespace) {
            keys.extend(ns.iter().map(String::as_str));
        }
        keys.extend(workload.authorization_policies.iter().map(String::as_str));
        keys.into_iter()
            .filter_map(|k| self.policies.get(k).cloned())
            .collect()
    }

    pub fn insert_address(&mut self, address: Address) {
        match address {
            Address::Workload(w) => self.insert_workload(w),
            Address::Service(s) => self.insert_service(s),
        }
    }

    fn insert_workload(&mut self, w: Arc<Workload>) {
        self.remove_workload(&w.uid);
        self.absent.remove(&w.uid);
        for key in w.network_addrs() {
            self.absent.remove(&key.to_string());
            self.workload_addrs.insert(key, Arc::clone(&w));
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone());
        }
        self.workloads.insert(w.uid.clone(), w);
    }

    fn insert_service(&mut self, s: Arc<Service>) {
        let key = s.key();
        self.remove_service(&key);
        self.absent.remove(&key);
        for vip in &s.vips {
            self.absent.remove(&vip.to_string());
            self.service_vips.insert(vip.clone(), Arc::clone(&s));
        }
        self.hosts
            .entry(s.hostname.clone())
            .or_default()
            .insert(key.clone());
        self.services.insert(key, s);
    }

    fn remove_workload(&mut self, uid: &str) -> bool {
        let Some(old) = self.workloads.remove(uid) else {
            return false;
        };
        for ip in &old.addresses {
            self.workload_addrs.remove(*ip, |w| w.uid == uid);
        }
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        true
    }

    fn remove_service(&mut self, key: &str) -> bool {
        let Some(old) = self.services.remove(key) else {
            return false;
        };
        for vip in &old.vips {
            self.service_vips.remove(vip.address, |s| s.key() == key);
        }
        if let Some(keys) = self.hosts.get_mut(&old.hostname) {
            keys.remove(key);
            if keys.is_empty() {
                self.hosts.remove(&old.hostname);
            }
        }
        true
    }

    /// Removes the Address resource `name` (uid, `ns/hostname`, or a
    /// `network/IP` alias resolving to either). A demanded name becomes a
    /// known negative answer.
    pub fn remove_address(&mut self, name: &str) {
        if !self.remove_workload(name)
            && !self.remove_service(name)
            && let Some(key) = NetworkAddr::parse(name)
        {
            if let Some(w) = self.workload_addrs.get(&key.network, key.address) {
                self.remove_workload(&w.uid);
            } else if let Some(s) = self.service_vips.get(&key.network, key.address) {
                self.remove_service(&s.key());
            }
        }
        self.mark_absent(name);
    }

    /// Records a negative answer for `name` if it was demanded.
    pub fn mark_absent(&mut self, name: &str) {
        if self.demanded.contains(name) {
            self.absent.insert(name.to_string());
        }
    }

    pub fn insert_policy(&mut self, p: Policy) {
        let key = p.key();
        self.remove_policy(&key);
        match p.scope {
            PolicyScope::Global => {
                self.global_policies.insert(key.clone());
            }
            PolicyScope::Namespace => {
                self.namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            PolicyScope::WorkloadSelector => {}
        }
        self.policies.insert(key, Arc::new(p));
    }

    pub fn remove_policy(&mut self, key: &str) {
        let Some(old) = self.policies.remove(key) else {
            return;
        };
        self.global_policies.remove(key);
        if let Some(set) = self.namespace_policies.get_mut(&old.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.namespace_policies.remove(&old.namespace);
            }
        }
    }
}

/// IP → objects holding it, each with the network it is on. Lookups take
/// `(&str, IpAddr)` without allocating. Several entries may share a network
/// and IP briefly (a new pod reusing an IP before the old one's removal):
/// the newest wins, and removing the old one leaves the new one in place.
pub(super) struct AddrIndex<T> {
    map: HashMap<IpAddr, Vec<(String, Arc<T>)>>,
}

impl<T> Default for AddrIndex<T> {
    fn default() -> Self {
        AddrIndex {
            map: HashMap::new(),
        }
    }
}

impl<T> AddrIndex<T> {
    fn get(&self, network: &str, ip: IpAddr) -> Option<Arc<T>> {
        self.map
            .get(&ip)?
            .iter()
            .rev()
            .find(|(n, _)| n == network)
            .map(|(_, v)| Arc::clone(v))
    }

    fn insert(&mut self, key: NetworkAddr, value: Arc<T>) {
        self.map
            .entry(key.address)
            .or_default()
            .push((key.network, value));
    }

    /// Drops the entries on `ip` for which `is_it` holds.
    fn remove(&mut self, ip: IpAddr, is_it: impl Fn(&T) -> bool) {
        if let Some(v) = self.map.get_mut(&ip) {
            v.retain(|(_, x)| !is_it(x));
            if v.is_empty() {
                self.map.remove(&ip);
            }
        }
    }
}
