# zotlb: the load balancer only. Build: docker build -t zotlb:0.1.0 .
FROM python:3.12-slim AS build
WORKDIR /src
# README.md* so the build also works before the README exists.
COPY pyproject.toml README.md* ./
COPY zotlb ./zotlb
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin zotlb
USER 10001
EXPOSE 5000
ENTRYPOINT ["zotlb"]
CMD ["serve", "-c", "/etc/zotlb/lb.yaml"]
