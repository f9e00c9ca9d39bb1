"""The deploy workflow: the route decision's consumer that drives build -> asset -> VM -> metering.

gatewayd records an accepted deployment and enqueues a ``deploy`` job (store.jobs). A deployer
worker claims it and runs :func:`workflow.run_deploy`, which only talks to the other services
through the small Protocols in :mod:`.api`, and reports every step to the deployment's event
stream, so ``unkey deploy --wait`` and the dashboard see live progress.
"""
