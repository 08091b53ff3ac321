# One image for every role of the testbed (coordinator, parties, attacks); the role comes from the command.
#
# With a registry:    docker build -t collab-testbed:latest .
#   (installs from the package index; for the CPU build of torch pass
#    --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU wheel index>)
# Air-gapped:         testbed/container/build-image.sh
#   (= docker build --build-arg BASE=testbed-base:bookworm ... with a host-built .cache/wheelhouse:
#    every Python package then comes from the wheelhouse, `pip install --no-index`)
#
# Works with Debian's python3 (/usr/bin/python3, debootstrapped base) and with python:3.11-slim
# (/usr/local/bin/python3).  Only classic Dockerfile syntax: no registry-hosted frontend, no BuildKit needed.

ARG BASE=python:3.11-slim

# ---------------------------------------------------------------- dependencies, in a throw-away stage
FROM ${BASE} AS deps
# lets build-image.sh drop the cached dependency stages of older builds
LABEL org.testbed.stage=deps
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
# The wheelhouse is optional: the glob matches nothing when .cache/wheelhouse does not exist, and
# pyproject.toml keeps the COPY valid.  Wheels stay in this stage; only /opt/venv reaches the image.
COPY pyproject.toml .cache/wheelhous[e] /wheels/
RUN set -eu; \
    /opt/venv/bin/python -c "import tomllib; d = tomllib.load(open('/wheels/pyproject.toml', 'rb')); print('\n'.join(d['project'].get('dependencies', []) + d.get('build-system', {}).get('requires', [])))" > /tmp/requirements.txt; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install --no-index --find-links /wheels -r /tmp/requirements.txt; \
    else \
        /opt/venv/bin/pip install -r /tmp/requirements.txt; \
    fi; \
    /opt/venv/bin/pip check

# ---------------------------------------------------------------- the image
FROM ${BASE}
# tc (iproute2) shapes links inside the containers; the debootstrapped base already has it
RUN command -v tc >/dev/null 2>&1 || { \
        apt-get update && apt-get install -y --no-install-recommends iproute2 && rm -rf /var/lib/apt/lists/*; }
COPY --from=deps /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /app
COPY pyproject.toml README.m[d] ./
COPY testbed/ testbed/
COPY parties/ parties/
COPY attacks/ attacks/
COPY scenarios/ scenarios/
# editable install: no copy of the sources in site-packages, and /app can be bind-mounted for development
RUN pip install --no-index --no-deps --no-build-isolation -e .
# One image, every role: `docker run IMAGE prepare|coordinator|party` (or ROLE=...), configured by
# environment variables (testbed/container/settings.py).  Other tools: --entrypoint python.
ENTRYPOINT ["python", "-m", "testbed.container"]
CMD []
