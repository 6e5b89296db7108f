"""The app the rate-limit process tests run under uvicorn; configured by RESILIENCE_* variables."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from fastapi_resilience import install, rate_limit

app = FastAPI()
resilience = install(app)


@app.get("/limited")
async def limited() -> dict[str, str]:
    return {"ok": "yes"}


@app.get("/exempt")
async def exempt() -> dict[str, str]:
    return {"ok": "yes"}


@app.post("/login", dependencies=[Depends(rate_limit("5/minute"))])
async def login() -> dict[str, str]:
    return {"ok": "yes"}
