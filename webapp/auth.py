"""Accounts: sign up, sign in (JWT access tokens), and who is asking."""

from __future__ import annotations

from flask import current_app
from flask.views import MethodView
from flask_jwt_extended import create_access_token
from flask_smorest import abort
from mongoengine import NotUniqueError

from models import User
from webapp.extensions import Blueprint, jwt
from webapp.passwords import check_password, dummy_check, hash_password
from webapp.schemas import SigninSchema, SignupSchema, TokenSchema, UserSchema

blp = Blueprint("auth", __name__, url_prefix="/auth", description="Accounts and access tokens")


@jwt.user_lookup_loader
def _load_user(header: dict, data: dict) -> User | None:
    return User.objects(id=data["sub"]).first()


@jwt.user_identity_loader
def _identity(user: User) -> str:
    return str(user.id)


@blp.route("/signup")
class Signup(MethodView):
    @blp.arguments(SignupSchema)
    @blp.response(201, UserSchema)
    @blp.alt_response(409, description="the username or email is taken")
    def post(self, data: dict):
        """Create an account."""
        email = data["email"].lower()
        for field, value in (("username", data["username"]), ("email", email)):
            if User.objects(**{field: value}).first() is not None:
                abort(409, message=f"that {field} is already taken", errors={field: ["already taken"]})
        user = User(
            username=data["username"],
            email=email,
            password_hash=hash_password(data["password"], current_app.config["BCRYPT_ROUNDS"]),
        )
        try:
            user.save()
        except NotUniqueError:
            # Another signup with the same name won the race between the check and the insert.
            abort(409, message="that username or email is already taken")
        return user


@blp.route("/signin")
class Signin(MethodView):
    @blp.arguments(SigninSchema)
    @blp.response(200, TokenSchema)
    @blp.alt_response(401, description="wrong email or password")
    def post(self, data: dict):
        """Exchange an email and password for an access token."""
        user = User.objects(email=data["email"].lower()).first()
        if user is None:
            dummy_check(data["password"], current_app.config["BCRYPT_ROUNDS"])
            abort(401, message="wrong email or password")
        if not check_password(data["password"], user.password_hash):
            abort(401, message="wrong email or password")
        expires = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
        return {
            "access_token": create_access_token(identity=user),
            "token_type": "bearer",
            "username": user.username,
            "expires_in": int(expires.total_seconds()),
        }
