"""A GPU node whose NVIDIA driver is older than the image's CUDA: the pod status says so, and the resource's status
names the driver floor and the fix, as it does for Unschedulable."""

from __future__ import annotations

import pytest

from llmops.status import DRIVER_FLOOR, GPU_DRIVER_TOO_OLD, job_verdict, pod_problems, service_verdict

# What a pod's status carries when the driver is too old, by where it fails:
RUNTIME_REFUSES = {"waiting": {"reason": "RunContainerError", "message": (
    "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: "
    "unable to start container process: error during container init: error running prestart hook #0: exit status "
    "1, stdout: , stderr: Auto-detected mode as 'legacy'\nnvidia-container-cli: requirement error: unsatisfied "
    "condition: cuda>=13.0, please update your driver to a newer version, or use an earlier cuda container: "
    "unknown")}}
CUDA_FAILS_IN_RAY = {"terminated": {"reason": "Error", "exitCode": 1, "message": (
    "RuntimeError: The NVIDIA driver on your system is too old (found version 12040). Please update your GPU "
    "driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")}}
CUDA_RUNTIME = {"terminated": {"reason": "Error", "exitCode": 1, "message": (
    "CUDA error: CUDA driver version is insufficient for CUDA runtime version")}}


def pod(state=None, last_state=None, name="viggo-ft-gpu-worker-x"):
    status = {"name": "ray-worker", "state": state or {}, "lastState": last_state or {}}
    return {"metadata": {"name": name}, "status": {"containerStatuses": [status]}}


@pytest.mark.parametrize("state, last_state", [
    (RUNTIME_REFUSES, None),
    ({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
     CUDA_FAILS_IN_RAY),
    (CUDA_RUNTIME, None),
], ids=["container-runtime", "crash-loop-log-tail", "cuda-runtime"])
def test_a_driver_too_old_for_the_image_is_named_with_its_floor(state, last_state):
    problems = pod_problems([pod(state, last_state)])
    assert GPU_DRIVER_TOO_OLD in {p.reason for p in problems}
    job = job_verdict("FineTune", False, {"status": {"jobDeploymentStatus": "Initializing"}}, {}, problems)
    service = service_verdict({"status": {}}, "", problems, "NewCluster")
    for verdict in (job, service):
        assert (verdict.phase, verdict.state, verdict.reason) == ("Pending", "stalled", GPU_DRIVER_TOO_OLD)
        assert f"NVIDIA driver {DRIVER_FLOOR} or newer" in verdict.message
        assert "viggo-ft-gpu-worker-x" in verdict.message and "docs/clusters.md" in verdict.message


def test_other_crashes_are_not_called_driver_problems():
    crash = {"terminated": {"reason": "Error", "exitCode": 1, "message": "ModuleNotFoundError: No module named 'x'"}}
    assert GPU_DRIVER_TOO_OLD not in {p.reason for p in pod_problems([pod(None, crash)])}
    assert DRIVER_FLOOR >= 580


def test_ray_containers_leave_their_log_tail_as_termination_message():
    from llmops.builders.raycluster import container
    assert container("ray-worker", "img", [], [], [], {}, {})["terminationMessagePolicy"] == "FallbackToLogsOnError"
