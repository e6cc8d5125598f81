import json

from django.core.management.base import BaseCommand

from orders.services import place_order


class Command(BaseCommand):
    help = "Place an order (and enqueue its payment in the same transaction)."

    def add_arguments(self, parser):
        parser.add_argument("item")

    def handle(self, item, **options):
        self.stdout.write(json.dumps(place_order(item)))
