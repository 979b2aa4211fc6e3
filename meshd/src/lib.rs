//! sidetunnel-meshd: a local control plane serving Istio's xDS and CA APIs.
