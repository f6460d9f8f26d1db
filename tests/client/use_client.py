"""Uses the Python client generated from Cloud48's OpenAPI document (openapi-python-client):
signs in with HTTP Digest, creates a project and an environment in it, adds a tomcat, waits
for the commands and reads everything back as typed objects. Every call is checked; the
script exits non-zero (with the reason) on the first surprise.

Usage: use_client.py PACKAGE_DIR BASE_URL USER PASSWORD
"""

import sys

sys.path.insert(0, sys.argv[1])

import httpx  # noqa: E402
from cloud_48_api_client import Client  # noqa: E402
from cloud_48_api_client.api.commands import show_command  # noqa: E402
from cloud_48_api_client.api.environments import (  # noqa: E402
    add_container,
    create_environment,
    show_environment,
)
from cloud_48_api_client.api.projects import create_project, show_project  # noqa: E402
from cloud_48_api_client.api.servers import list_servers  # noqa: E402
from cloud_48_api_client.models import (  # noqa: E402
    Accepted,
    AddContainer,
    CommandStatus,
    CreateEnvironment,
    CreateProject,
    Environment,
    ErrorBody,
    Project,
    Quota,
)

base, user, password = sys.argv[2], sys.argv[3], sys.argv[4]
client = Client(base_url=base, httpx_args={"auth": httpx.DigestAuth(user, password)})


def check(what, value, kind):
    if not isinstance(value, kind):
        sys.exit(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def done(accepted):
    command = show_command.sync(accepted.command_id, client=client, wait=60)
    if command.status != CommandStatus.SUCCEEDED:
        sys.exit(f"command {accepted.command_id} ended {command.status}: {command.error}")
    return command


servers = list_servers.sync(client=client)
if not servers or not all(s.name for s in servers):
    sys.exit(f"servers: {servers!r}")

project = check(
    "create project",
    create_project.sync(
        client=client, body=CreateProject(name="typed", quota=Quota(containers=5))
    ),
    Project,
)
if project.quota.containers != 5:
    sys.exit(f"quota read back as {project.quota!r}")

created = check(
    "create environment",
    create_environment.sync(
        client=client, body=CreateEnvironment(name="typed-env", project="typed")
    ),
    Accepted,
)
done(created)
added = check(
    "add container",
    add_container.sync("typed-env", client=client, body=AddContainer(type_="tomcat")),
    Accepted,
)
done(added)

env = check("show environment", show_environment.sync("typed-env", client=client), Environment)
if env.project != "typed" or [m.type_.split("@")[0] for m in env.members] != ["tomcat"]:
    sys.exit(f"environment read back as {env!r}")
if project_after := show_project.sync("typed", client=client):
    if project_after.usage.containers != 1:
        sys.exit(f"usage read back as {project_after.usage!r}")

# Errors come back typed too.
refused = check(
    "a second environment of the same name",
    create_environment.sync(client=client, body=CreateEnvironment(name="typed-env")),
    ErrorBody,
)
if "already exists" not in refused.error.message:
    sys.exit(f"refusal read back as {refused!r}")
print("typed client: ok")
