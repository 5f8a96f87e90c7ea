"""`tandem planner`: observe the pools' load, predict TTFT / TPOT from a profile, scale prefill and decode.

observe (metrics -> ``ClusterLoad``) -> decide (pure: profile + SLO + load + state -> replica counts)
-> actuate (Kubernetes scale subresource, or a dry run that only logs); ``loop`` runs them every interval.
"""
