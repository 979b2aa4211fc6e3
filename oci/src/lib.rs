//! Reads OCI bundles for the shim: tells a pod sandbox from an app container by
//! CRI annotations and extracts pod information and per-pod settings.
