"""What the tests and the benches share to run the platform (never imported by the product).

- `platform.Served`: the platform in this process (embedded.py's one assembly), its API over HTTP,
  peers as processes;
- `processes`: peer processes, `make run` / `make api` as a user starts them;
- `simulated`: hundreds of simulated peers per process, speaking the protocol module's messages;
- `http`: a user of the REST API and its event streams; `datasets`: CSVs to train on;
- `rabbitnode`: a private RabbitMQ node to stop and start; `waiting`: deadlines, never sleeps.
"""
