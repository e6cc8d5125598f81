from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from .services import place_order, show_order


@csrf_exempt
@require_POST
def place(request):
    try:
        return JsonResponse(place_order(request.GET.get("item", "tea"), fail=request.GET.get("fail") == "1"),
                            status=201)
    except RuntimeError as exc:  # rolled back: neither the order nor its job exists
        return JsonResponse({"error": str(exc)}, status=500)


@require_GET
def show(request, pk):
    body = show_order(pk)
    return JsonResponse(body or {"error": "no such order"}, status=200 if body else 404)
