# One image for every peertrain process: the API, the coordinator, the monitor, the peers and Flower.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY requirements.txt .
# The CPU build of torch: peers with a GPU use an image built with the CUDA index instead.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url ${TORCH_INDEX} -r requirements.txt

COPY settings.py celeryconfig.py embedded.py ./
COPY models ./models
COPY tasks ./tasks
COPY trainer ./trainer
COPY webapp ./webapp
COPY samples ./samples

RUN useradd --create-home peertrain
USER peertrain
EXPOSE 8000
CMD ["granian", "--interface", "wsgi", "--factory", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", \
     "--blocking-threads", "2", "--no-ws", "webapp:create_app"]
