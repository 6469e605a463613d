"""The shared service runtime: one ``serve()`` for every Trapline service.

Import what a service needs from here::

    from trapline.runtime import App, Registration, ServiceSettings, run, errors
"""

from . import errors
from .server import App, Registration, RunningServer, StartupError, bring_up, run, serve, start_server
from .settings import ServiceSettings, SettingsError, load_settings

__all__ = [
    "App",
    "Registration",
    "RunningServer",
    "ServiceSettings",
    "SettingsError",
    "StartupError",
    "bring_up",
    "errors",
    "load_settings",
    "run",
    "serve",
    "start_server",
]
