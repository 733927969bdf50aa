# Pillion: proxy, control server and CLI in one image.
#
#   docker build -t pillion .                                  (default base: a slim Python image)
#   podman build --format docker --build-arg BASE_IMAGE=localhost/base:bookworm -t pillion .
#       (any base with python3 >= 3.11; --format docker keeps the HEALTHCHECK)
#
# The proxy runs as uid 1337 so the interception rules (`pillion init-iptables`) can exempt it.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/pillion PATH=/opt/pillion/bin:$PATH

# A Debian base without python3-venv gets it (and iptables for the init step) here; a python:* base has both
# or needs only iptables.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null || ! command -v iptables >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3-venv iptables ca-certificates \
        && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/pillion

COPY pyproject.toml README.md /src/
COPY proxy /src/proxy
COPY control /src/control
COPY certs /src/certs
# PIP_CERT_FILE: a CA bundle for a network behind a TLS-inspecting proxy (mount it with `podman build -v`).
ARG PIP_CERT_FILE=
RUN if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && pip install /src \
    && pip install --no-deps --force-reinstall "$(grep -o 'opentelemetry-proto==[0-9.]*' /src/pyproject.toml)" \
    && rm -rf /src

RUN (getent group 1337 || groupadd -g 1337 pillion) && (getent passwd 1337 || useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin pillion)
USER 1337
EXPOSE 15000 15001 15006 15010 15021 15090
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=1).status == 200 else 1)"
ENTRYPOINT ["pillion"]
CMD ["--help"]
