"""Actuators: set a pool's replica count. ``KubernetesScaler`` patches the worker Deployments' scale
subresource through the ``kubernetes`` client; ``DryRun`` only reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from services.planner.decide import Decision

log = logging.getLogger("tandem.planner")


class ScaleError(RuntimeError):
    """A Deployment could not be read or scaled (its name, namespace and the API's answer in the message)."""


class Actuator(Protocol):
    def replicas(self, role: str) -> int | None:
        """The pool's spec.replicas now (None: not known to this actuator)."""

    def available(self, role: str) -> int | None:
        """The pool's replicas up and available now (None: not known); below spec.replicas while pods start or
        cannot be placed."""

    def scale(self, role: str, replicas: int, reason: str) -> None: ...


@runtime_checkable
class PoolsActuator(Protocol):
    """An actuator that can change several pools at once (``LocalScaler``: each pool's new workers start
    concurrently with the others'); returns once every pool is at its count."""

    def scale_pools(self, targets: Sequence[tuple[str, int, str]]) -> None:
        """(role, replicas, reason) per pool to change."""


def scale_changed(actuator: Actuator, decisions: Sequence[Decision]) -> None:
    """Apply the decisions that change a count: all at once where the actuator can, else one pool after the
    other."""
    targets = [(d.role, d.desired, d.reason) for d in decisions if d.changed]
    if isinstance(actuator, PoolsActuator):
        if targets:
            actuator.scale_pools(targets)
        return
    for role, replicas, reason in targets:
        actuator.scale(role, replicas, reason)


class DryRun:
    """Scales nothing; each call to ``scale`` goes to `report` (default: the log)."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.report = report or log.info
        self.counts: dict[str, int] = {}

    def replicas(self, role: str) -> int | None:
        return self.counts.get(role)

    def available(self, role: str) -> int | None:
        return None  # it places nothing: the workers observed are what is there

    def scale(self, role: str, replicas: int, reason: str) -> None:
        self.counts[role] = replicas
        self.report(f"dry run: {role} -> {replicas} ({reason})")


class KubernetesScaler:
    """Scales one Deployment per pool through apps/v1 ``deployments/{name}/scale``.

    `api` is a ``kubernetes.client.AppsV1Api`` (``from_cluster`` builds one from the in-cluster service account
    or the kubeconfig). `deployments` maps a role to its Deployment's name.
    """

    def __init__(self, api: Any, namespace: str, deployments: Mapping[str, str]) -> None:
        self.api, self.namespace, self.deployments = api, namespace, dict(deployments)

    @staticmethod
    def from_cluster(namespace: str, deployments: Mapping[str, str]) -> KubernetesScaler:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return KubernetesScaler(client.AppsV1Api(), namespace, deployments)

    def replicas(self, role: str) -> int | None:
        scale = self._call("read", role, lambda name: self.api.read_namespaced_deployment_scale(name, self.namespace))
        return scale.spec.replicas

    def available(self, role: str) -> int | None:
        """The Deployment's status.availableReplicas (absent in the status while none is available: 0)."""
        deployment = self._call("read", role,
                                lambda name: self.api.read_namespaced_deployment_status(name, self.namespace))
        return (deployment.status.available_replicas or 0) if deployment.status else 0

    def scale(self, role: str, replicas: int, reason: str) -> None:
        body = {"spec": {"replicas": replicas}}
        self._call("scale", role,
                   lambda name: self.api.patch_namespaced_deployment_scale(name, self.namespace, body))
        log.info("scaled %s (%s/%s) to %d: %s", role, self.namespace, self.deployments[role], replicas, reason)

    def _call(self, verb: str, role: str, call: Callable[[str], Any]) -> Any:
        from kubernetes.client.exceptions import ApiException

        name = self.deployments[role]
        try:
            return call(name)
        except ApiException as exc:
            what = "no such Deployment" if exc.status == 404 else f"HTTP {exc.status} {exc.reason}"
            raise ScaleError(f"cannot {verb} the {role} Deployment {self.namespace}/{name}: {what}") from exc
