"""Accounts."""

from __future__ import annotations

from mongoengine import DateTimeField, Document, EmailField, StringField

from models.db import utcnow


class User(Document):
    """A person who signs in and runs sessions; the password is kept only as a bcrypt hash."""

    username = StringField(required=True, unique=True, min_length=3, max_length=40)
    email = EmailField(required=True, unique=True)
    password_hash = StringField(required=True)
    created_at = DateTimeField(default=utcnow)

    meta = {"collection": "users"}
