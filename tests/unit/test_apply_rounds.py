"""The order a set of children is applied in: the work first, the marker of the whole set last."""

from __future__ import annotations

from llmops.handlers.ordering import apply_rounds


def child(kind: str, name: str, role: str | None = None) -> dict:
    labels = {"llmops.dev/role": role} if role else {}
    return {"kind": kind, "metadata": {"name": name, "labels": labels}}


JOB = [child("ConfigMap", "r", "result"), child("ServiceAccount", "sa"), child("Role", "role"),
       child("RoleBinding", "rb"), child("ConfigMap", "payloads", "payloads"), child("ConfigMap", "cfg", "config"),
       child("RayJob", "job")]


def names(rounds: list[list[dict]]) -> list[list[str]]:
    return [[c["metadata"]["name"] for c in r] for r in rounds]


def test_a_job_starts_with_its_ray_job_and_ends_with_its_result_report():
    assert names(apply_rounds(JOB, "RayJob")) == [["sa", "job"], ["role", "payloads", "cfg"], ["rb"], ["r"]]


def test_every_child_is_applied_exactly_once():
    rounds = apply_rounds(JOB, "RayJob")
    flat = [c for r in rounds for c in r]
    assert len(flat) == len(JOB) and all(any(c is j for c in flat) for j in JOB)


def test_a_service_with_only_its_ray_service_is_one_round():
    service = [child("RayService", "svc")]
    assert names(apply_rounds(service, "RayService")) == [["svc"]]


def test_without_a_result_report_the_ray_object_is_the_marker_and_goes_last():
    children = [child("ServiceAccount", "sa"), child("Role", "role"), child("RoleBinding", "rb"),
                child("RayService", "svc")]
    assert names(apply_rounds(children, "RayService")) == [["sa", "role"], ["rb"], ["svc"]]
