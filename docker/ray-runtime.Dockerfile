# Ray runtime image for FineTune jobs: the pinned Ray image plus LLaMA-Factory 0.9.4 and the versions it pins,
# so jobs start without a pip step (the operator's default installs LLaMA-Factory through the runtime env).
# Build from the repository root:  docker build -f docker/ray-runtime.Dockerfile -t llmops/ray-llamafactory:2.60.0-0.9.4 .
# Then point the operator at it (Helm values):
#   settings.finetune_image: llmops/ray-llamafactory:2.60.0-0.9.4
#   settings.finetune_pip: []
# Versions: pyproject.toml's `training` extra (tests/unit/test_chart.py keeps them equal).

FROM rayproject/ray:2.60.0-py311-cu128
RUN python -m pip install --no-cache-dir "ray[train]==2.60.0" "llamafactory==0.9.4" "peft==0.17.1" \
 && python -c "import llamafactory, peft"
# The Ray image's own non-root user (uid 1000).
USER 1000
