# Ray runtime image for FineTune jobs, the operator's default finetune_image: the stock Ray image plus LLaMA-Factory
# 0.9.4 and its pins (Settings.FINETUNE_PIP_FALLBACK, what the operator otherwise installs through the runtime env
# on every pod), and flash-attn for FA2 varlen attention. The release workflow builds and publishes it as
#   ghcr.io/<owner>/llmops-ray-llamafactory:<version>
# Build it yourself from the repository root:
#   docker build -f docker/ray-runtime.Dockerfile -t <registry>/llmops-ray-llamafactory:0.1.0 .
# tests/unit/test_chart.py keeps the pins equal to pyproject.toml's `training` extra and FINETUNE_PIP_FALLBACK.

FROM rayproject/ray:2.57.0-py312-cu130
RUN python -m pip install --no-cache-dir "ray[train]==2.57.0" "llamafactory==0.9.4" "peft==0.17.1" \
      "transformers==4.52.4" "liger-kernel==0.5.10" "torch==2.11.0" "torchaudio==2.11.0" "torchvision==0.26.0"
# flash-attn compiles against the torch above unless its setup finds a prebuilt wheel for this torch/CUDA/Python
# (a source build needs the CUDA toolkit's nvcc and takes long: MAX_JOBS bounds its memory).
RUN MAX_JOBS=4 python -m pip install --no-cache-dir --no-build-isolation "flash-attn==2.8.3.post2" \
 && python -c "import flash_attn, liger_kernel, llamafactory, peft"
# The Ray image's own non-root user (uid 1000).
USER 1000
