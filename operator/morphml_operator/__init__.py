"""The MorphML Kubernetes operator (kopf): builders (spec -> manifests) and handlers."""
