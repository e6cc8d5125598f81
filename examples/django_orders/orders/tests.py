"""Django tests of the orders app with pgbroker.testing (run: python manage.py test orders).

Django's test runner uses the database ``test_<NAME>``; ``django_database_url()`` names
it, so the sandbox's schema lives there and a ``.delay()`` inside ``atomic()`` joins
Django's transaction as in production. pgbroker.testing reads committed jobs, hence
``TransactionTestCase`` (a ``TestCase`` never commits its test's transaction).
"""
from celery import current_app
from django.test import TransactionTestCase

from pgbroker.testing import django_database_url, sandbox

from .models import Order, Payment


class PlaceOrderTests(TransactionTestCase):
    def setUp(self):
        self.box = self.enterContext(sandbox(django_database_url()))
        self.box.configure(current_app)

    def test_a_placed_order_enqueues_its_charge_which_charges_it(self):
        placed = self.client.post("/orders?item=tea").json()
        self.box.assert_enqueued(task="orders.tasks.charge", args=[placed["order"]])
        self.assertEqual(self.box.drain(current_app).completed, 1)
        self.assertEqual(Order.objects.get(pk=placed["order"]).status, "charged")
        self.assertEqual(Payment.objects.count(), 1)

    def test_a_failed_order_leaves_neither_the_order_nor_its_job(self):
        self.assertEqual(self.client.post("/orders?item=cake&fail=1").status_code, 500)
        self.box.refute_enqueued(task="orders.tasks.charge")
        self.assertFalse(Order.objects.exists())
