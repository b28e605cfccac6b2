"""MongoDB documents and the queries on them (mongoengine only: no Flask, Celery or torch)."""

from models.assignment import Assignment
from models.db import connect, disconnect, ensure_connected, ping, utcnow
from models.heartbeat import Heartbeat
from models.peer import Peer
from models.pool import Pool
from models.session import Dataset, PeerRun, Round, TrainingSession
from models.user import User

__all__ = [
    "Assignment",
    "Dataset",
    "Heartbeat",
    "Peer",
    "PeerRun",
    "Pool",
    "Round",
    "TrainingSession",
    "User",
    "connect",
    "disconnect",
    "ensure_connected",
    "ping",
    "utcnow",
]
