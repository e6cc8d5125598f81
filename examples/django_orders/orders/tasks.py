from celery import shared_task
from django.db import transaction

from .models import Order, Payment


@shared_task(bind=True, max_retries=3)
def charge(self, order_id: int) -> str:
    """The order is always there: it committed in the same transaction as this job."""
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id)
        order.status = "charged"
        order.save()
        Payment.objects.create(order=order)
    return f"charged order {order_id}"
