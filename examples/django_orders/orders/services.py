from django.db import transaction

from .models import Order
from .tasks import charge


def place_order(item: str, fail: bool = False) -> dict:
    """Create an order and enqueue its payment: both commit, or neither exists."""
    with transaction.atomic():
        order = Order.objects.create(item=item)
        result = charge.delay(order.pk)  # joins this transaction (join_django_atomic)
        order.task_id = result.id
        order.save(update_fields=["task_id"])
        if fail:
            raise RuntimeError(f"request failed after enqueueing {result.id}")
    return {"order": order.pk, "task": result.id}


def show_order(pk: int) -> dict | None:
    order = Order.objects.filter(pk=pk).first()
    if order is None:
        return None
    result = charge.AsyncResult(order.task_id)
    return {"order": order.pk, "item": order.item, "status": order.status, "task_state": result.state,
            "payments": order.payment_set.count()}
