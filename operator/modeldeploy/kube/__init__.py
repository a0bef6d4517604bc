"""The Kubernetes side that is not specific to any resource kind: the async API client (server-side
apply, watches, Events), the watch cache, the work queue, leader election and kopf's patch."""
