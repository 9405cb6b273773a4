# Portico appliance image. CPU by default; build with --build-arg EXTRAS=gpu for onnxruntime-gpu.
FROM python:3.11-slim-bookworm
ARG EXTRAS=""
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/portico
COPY pyproject.toml README.md LICENSE ./
COPY appliance appliance
COPY dicom_router dicom_router
COPY inference inference
COPY fl_client fl_client
COPY models models
COPY config config
COPY orthanc orthanc
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
RUN useradd --system --home /var/lib/portico portico && mkdir -p /var/lib/portico && chown portico /var/lib/portico
# NVFlare's own user, for a container run as root (`user: root`): Portico then runs NVFlare as portico-fl
# (fl.run_as). As the image's default user `portico`, the container is the FL client's box (docs/fl.md).
RUN useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin portico-fl
USER portico
ENV PORTICO_CONFIG=/etc/portico/portico.yaml
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD echoscu -aet HEALTHCHECK -aec PORTICO 127.0.0.1 11112 || exit 1
ENTRYPOINT ["portico"]
CMD ["serve"]
