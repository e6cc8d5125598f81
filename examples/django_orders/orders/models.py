from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    status = models.CharField(max_length=20, default="new")
    task_id = models.CharField(max_length=36, null=True)


class Payment(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE)
