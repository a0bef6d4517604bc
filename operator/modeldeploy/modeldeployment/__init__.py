"""The ModelDeployment controller: observe (cache only) -> decide (pure) -> act, the rollout state
machine, the children a revision becomes, and the analysis windows run beside the reconcile."""
