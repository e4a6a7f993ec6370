//! Kubernetes control plane.
