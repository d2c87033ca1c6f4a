# Image of the drnn-stream worker: the package installed into python:3.11-slim,
# run as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NUMBA_CACHE_DIR=/var/cache/drnn/numba

# A fixed uid and gid let operators set the owner of bind-mounted checkpoint directories.
RUN groupadd --system --gid 10001 drnn \
    && useradd --system --uid 10001 --gid drnn --create-home --home-dir /home/drnn \
        --shell /usr/sbin/nologin drnn

WORKDIR /opt/drnn-stream/src
COPY pyproject.toml README.md ./
COPY drnn_core/ drnn_core/
COPY streamer/ streamer/
RUN pip install --no-cache-dir ".[serve]"

# Numba writes its compile cache to NUMBA_CACHE_DIR because site-packages is
# owned by root. Docker copies the owner of /var/lib/drnn/checkpoints into a
# new named volume mounted there, so the worker can write checkpoints to it.
RUN mkdir -p /var/lib/drnn/checkpoints /var/cache/drnn/numba \
    && chown -R drnn:drnn /var/lib/drnn /var/cache/drnn

USER drnn
WORKDIR /home/drnn

# Compile the Numba kernels once at build time into NUMBA_CACHE_DIR, so a new
# container loads them in about a second instead of compiling them for 15 to
# 30 s before its first event. Numba compiles again if the host's CPU differs.
RUN python -c "import drnn_core.kernels, drnn_core.baselines"

# Prometheus metrics, served at the port of DRNN_METRICS_ADDRESS.
# 9400: worker metrics and health; 8000: drnn-stream serve.
EXPOSE 9400 8000

ENTRYPOINT ["drnn-stream"]
CMD ["worker"]
