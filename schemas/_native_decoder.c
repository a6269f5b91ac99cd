/* Column-wise decoding of flat Avro single-object values: the native half of
 * ``schemas.native_decoder`` (read that module's docstring first).
 *
 * The loop proves and decodes the values in one pass, without the GIL (why C:
 * docs/performance.md, "Why the code is shaped this way").
 *
 * decode(values, start, header, plan, max_bytes, max_total, allocate) -> (None, stop)
 *                                             | (rows, ok, columns, data, data_len, stop)
 *   values    list of bytes (or None): single-object values, header + body
 *   start     the first index of values to look at
 *   header    the 10-byte header of the writer schema this plan decodes
 *   plan      3 bytes per field of the writer schema, in order:
 *             kind (KIND_* below), null branch (0 or 1; 2 = not a union), wanted (0/1)
 *   max_bytes values longer than this are left to the caller
 *   max_total body bytes a call takes at most (but always one value); at most 2**31 - 1
 *             like max_bytes, as views hold int32 offsets
 *   allocate  allocate(size) -> a writable buffer (pyarrow.allocate_buffer)
 * Looks at values[start:stop]: stop < len(values) only when more bodies would exceed
 * max_total (call again from stop). Of the ``count`` values there that carry the header
 * and are not too long:
 *   rows      int64[count]: their indices in ``values``
 *   ok        uint8[count]: 1 where the body is exactly one record of the plan, every
 *             varint fits its type, every string is valid UTF-8 and every union index
 *             is 0 or 1; 0 otherwise (the caller's per-record path decides those)
 *   columns   per wanted field, in order: (values, validity). values: int64 for int and
 *             long, float32, float64, uint8 for boolean, Arrow binary views (16 bytes)
 *             into ``data`` for string and bytes. validity: an Arrow bitmap for union
 *             fields, else None. Rows with ok = 0 hold zero / empty / null.
 *   data      the bytes of every string longer than 12 (shorter ones are inline), of
 *             all string columns; data_len of them are used
 * Returns (None, stop) when no value there carries the header.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { KIND_NULL, KIND_BOOLEAN, KIND_INT, KIND_LONG, KIND_FLOAT, KIND_DOUBLE,
       KIND_STRING, KIND_BYTES, KIND_COUNT };

#define HEADER_LEN 10
#define NOT_A_UNION 2
/* The values are objects scattered over the heap: fetch this many ahead (a cache miss
 * per value otherwise costs more than decoding it). */
#define PREFETCH_AHEAD 8
/* Arrow binary views: 16 bytes each, offsets into the data buffer are int32. */
#define VIEW_SIZE 16

typedef struct {
    PyObject *owner; /* what allocate() returned */
    Py_buffer view;
} Out;

typedef struct {
    int kind, null_branch, wanted;
    Out values, validity; /* validity: union fields only */
    /* the row being decoded */
    int present;
    int64_t i64;
    double f64;
    float f32;
    const uint8_t *str;
    Py_ssize_t str_len;
} Field;

/* One Avro long (zig-zag varint) of at most max_len bytes; 0 when malformed. */
static int read_long(const uint8_t **at, const uint8_t *end, int max_len, int64_t *out)
{
    uint64_t z = 0;
    const uint8_t *p = *at;
    for (int k = 0; k < max_len; k++) {
        if (p >= end)
            return 0;
        uint8_t b = *p++;
        if (k == 9 && b > 1)
            return 0; /* more than 64 bits */
        z |= (uint64_t)(b & 0x7F) << (7 * k);
        if (b < 0x80) {
            *out = (int64_t)(z >> 1) ^ -(int64_t)(z & 1);
            *at = p;
            return 1;
        }
    }
    return 0;
}

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as Python and
 * Rust decode it. */
static int utf8_valid(const uint8_t *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (!(word & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (c < 0xC2 || c > 0xF4 || i + len > n)
            return 0;
        for (int k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        uint8_t c1 = s[i + 1];
        if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) ||
            (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90))
            return 0;
        i += len;
    }
    return 1;
}

/* Read one value of field f at *at into f's row slots; 0 when malformed. */
static int read_field(Field *f, const uint8_t **at, const uint8_t *end)
{
    f->present = 1;
    if (f->null_branch != NOT_A_UNION) {
        int64_t branch;
        if (!read_long(at, end, 10, &branch) || (branch != 0 && branch != 1))
            return 0;
        if (branch == f->null_branch) {
            f->present = 0;
            return 1;
        }
    }
    const uint8_t *p = *at;
    int64_t size;
    switch (f->kind) {
    case KIND_NULL:
        return 1;
    case KIND_BOOLEAN:
        if (p >= end || *p > 1)
            return 0;
        f->i64 = *p;
        *at = p + 1;
        return 1;
    case KIND_INT:
        return read_long(at, end, 5, &f->i64) && f->i64 >= INT32_MIN && f->i64 <= INT32_MAX;
    case KIND_LONG:
        return read_long(at, end, 10, &f->i64);
    case KIND_FLOAT:
        if (end - p < 4)
            return 0;
        memcpy(&f->f32, p, 4);
        *at = p + 4;
        return 1;
    case KIND_DOUBLE:
        if (end - p < 8)
            return 0;
        memcpy(&f->f64, p, 8);
        *at = p + 8;
        return 1;
    default: /* string, bytes */
        if (!read_long(at, end, 10, &size) || size < 0 || size > end - *at)
            return 0;
        f->str = *at;
        f->str_len = (Py_ssize_t)size;
        *at += size;
        return f->kind == KIND_BYTES || utf8_valid(f->str, f->str_len);
    }
}

/* Bytes per row in a field's values buffer (string views included). */
static int slot_width(int kind)
{
    switch (kind) {
    case KIND_BOOLEAN: return 1;
    case KIND_FLOAT: return 4;
    case KIND_STRING: case KIND_BYTES: return VIEW_SIZE;
    default: return 8;
    }
}

/* An Arrow binary view of s: inline up to 12 bytes, else prefix + offset into data. */
static void store_view(uint8_t *view, const uint8_t *s, Py_ssize_t len, uint8_t *data,
                       Py_ssize_t *data_len)
{
    int32_t length = (int32_t)len, buffer = 0, offset = (int32_t)*data_len;
    memcpy(view, &length, 4);
    if (len <= 12) {
        memcpy(view + 4, s, (size_t)len);
        return;
    }
    memcpy(view + 4, s, 4);
    memcpy(view + 8, &buffer, 4);
    memcpy(view + 12, &offset, 4);
    memcpy(data + *data_len, s, (size_t)len);
    *data_len += len;
}

/* Store field f's row slots as row r of its (zeroed) output buffers. */
static void store(Field *f, Py_ssize_t r, uint8_t *data, Py_ssize_t *data_len)
{
    if (!f->present)
        return; /* zero, empty or null already */
    if (f->validity.owner != NULL)
        ((uint8_t *)f->validity.view.buf)[r >> 3] |= (uint8_t)(1u << (r & 7));
    uint8_t *values = f->values.view.buf;
    switch (f->kind) {
    case KIND_BOOLEAN: values[r] = (uint8_t)f->i64; break;
    case KIND_FLOAT: memcpy(values + 4 * r, &f->f32, 4); break;
    case KIND_DOUBLE: memcpy(values + 8 * r, &f->f64, 8); break;
    case KIND_STRING: case KIND_BYTES:
        store_view(values + VIEW_SIZE * r, f->str, f->str_len, data, data_len);
        break;
    default: memcpy(values + 8 * r, &f->i64, 8); break;
    }
}

/* A writable buffer of size bytes (zeroed if asked) from allocate() (Arrow's memory pool: it keeps
 * freed memory, where fresh pages from the OS cost a fault each). */
static int take(PyObject *allocate, Py_ssize_t size, Out *out, int zero)
{
    out->owner = PyObject_CallFunction(allocate, "n", size);
    if (out->owner == NULL)
        return 0;
    if (PyObject_GetBuffer(out->owner, &out->view, PyBUF_WRITABLE) < 0) {
        Py_CLEAR(out->owner);
        return 0;
    }
    if (out->view.len < size) {
        PyBuffer_Release(&out->view);
        Py_CLEAR(out->owner);
        PyErr_SetString(PyExc_ValueError, "allocate() returned a short buffer");
        return 0;
    }
    if (zero)
        memset(out->view.buf, 0, (size_t)size);
    return 1;
}

/* The owner of out, its view released (NULL -> None). */
static PyObject *give(Out *out)
{
    if (out->owner == NULL)
        return Py_NewRef(Py_None);
    PyBuffer_Release(&out->view);
    PyObject *owner = out->owner;
    out->owner = NULL;
    return owner;
}

static void drop(Out *out)
{
    if (out->owner != NULL) {
        PyBuffer_Release(&out->view);
        Py_CLEAR(out->owner);
    }
}

/* Decode every body; 1 in ok[r] where row r is exactly one valid record. No GIL. */
static void decode_rows(Field *fields, int nfields, const uint8_t **bodies,
                        const Py_ssize_t *lengths, Py_ssize_t count, uint8_t *ok,
                        uint8_t *data, Py_ssize_t *data_len)
{
    for (Py_ssize_t r = 0; r < count; r++) {
        if (r + PREFETCH_AHEAD < count) {
            const uint8_t *ahead = bodies[r + PREFETCH_AHEAD];
            for (Py_ssize_t at = 0; at < lengths[r + PREFETCH_AHEAD]; at += 64)
                __builtin_prefetch(ahead + at);
        }
        const uint8_t *p = bodies[r] + HEADER_LEN, *end = bodies[r] + lengths[r];
        int good = 1;
        for (int i = 0; i < nfields && good; i++)
            good = read_field(&fields[i], &p, end);
        ok[r] = (uint8_t)(good && p == end);
        if (!ok[r])
            continue;
        for (int i = 0; i < nfields; i++)
            if (fields[i].wanted)
                store(&fields[i], r, data, data_len);
    }
}

static PyObject *decode(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *values, *allocate, *result = NULL, *columns = NULL;
    const char *header, *plan;
    Py_ssize_t header_len, plan_len, max_bytes, max_total, start, n, count = 0, body_bytes = 0;
    Py_ssize_t data_len = 0, stop;
    Out rows = {0}, ok = {0}, data = {0};
    if (!PyArg_ParseTuple(args, "O!ny#y#nnO", &PyList_Type, &values, &start, &header,
                          &header_len, &plan, &plan_len, &max_bytes, &max_total, &allocate))
        return NULL;
    n = PyList_GET_SIZE(values);
    if (header_len != HEADER_LEN || plan_len % 3 != 0 || plan_len == 0 || start < 0 ||
        start > n || max_total > INT32_MAX || max_bytes > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "decode: bad arguments");
        return NULL;
    }
    int nfields = (int)(plan_len / 3);
    Py_ssize_t room = n - start ? n - start : 1;
    Field *fields = PyMem_Calloc((size_t)nfields, sizeof(Field));
    const uint8_t **bodies = PyMem_Malloc(sizeof(*bodies) * (size_t)room);
    Py_ssize_t *lengths = PyMem_Malloc(sizeof(*lengths) * (size_t)room);
    PyObject **held = PyMem_Malloc(sizeof(*held) * (size_t)room);
    int64_t *row_index = PyMem_Malloc(sizeof(*row_index) * (size_t)room);
    if (!fields || !bodies || !lengths || !held || !row_index) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < nfields; i++) {
        fields[i].kind = (uint8_t)plan[3 * i];
        fields[i].null_branch = (uint8_t)plan[3 * i + 1];
        fields[i].wanted = plan[3 * i + 2] != 0 && plan[3 * i] != KIND_NULL;
        if (fields[i].kind >= KIND_COUNT || fields[i].null_branch > NOT_A_UNION) {
            PyErr_SetString(PyExc_ValueError, "decode: bad plan");
            goto done;
        }
    }
    /* Pass 1 (GIL held): the values carrying the header, up to max_total body bytes;
     * the caller goes on from ``stop``. */
    for (stop = start; stop < n; stop++) {
        if (stop + PREFETCH_AHEAD < n)
            __builtin_prefetch(PyList_GET_ITEM(values, stop + PREFETCH_AHEAD));
        PyObject *item = PyList_GET_ITEM(values, stop);
        if (!PyBytes_Check(item))
            continue;
        Py_ssize_t len = PyBytes_GET_SIZE(item);
        const char *raw = PyBytes_AS_STRING(item);
        if (len < HEADER_LEN || len > max_bytes || memcmp(raw, header, HEADER_LEN) != 0)
            continue;
        if (count > 0 && body_bytes + len - HEADER_LEN > max_total)
            break;
        Py_INCREF(item); /* the list may change while the GIL is released */
        held[count] = item;
        bodies[count] = (const uint8_t *)raw;
        lengths[count] = len;
        row_index[count++] = stop;
        body_bytes += len - HEADER_LEN;
    }
    if (count == 0) {
        result = Py_BuildValue("(On)", Py_None, stop);
        goto done;
    }
    if (!take(allocate, 8 * count, &rows, 0) || !take(allocate, count, &ok, 0) ||
        !take(allocate, body_bytes, &data, 0))
        goto done;
    memcpy(rows.view.buf, row_index, (size_t)(8 * count));
    for (int i = 0; i < nfields; i++) {
        Field *f = &fields[i];
        if (f->wanted && (!take(allocate, slot_width(f->kind) * count, &f->values, 1) ||
                          (f->null_branch != NOT_A_UNION &&
                           !take(allocate, (count + 7) / 8, &f->validity, 1))))
            goto done;
    }
    /* Pass 2 (GIL released): prove and decode. */
    Py_BEGIN_ALLOW_THREADS
    decode_rows(fields, nfields, bodies, lengths, count, ok.view.buf, data.view.buf, &data_len);
    Py_END_ALLOW_THREADS
    if (!(columns = PyList_New(0)))
        goto done;
    for (int i = 0; i < nfields; i++) {
        if (!fields[i].wanted)
            continue;
        PyObject *column = PyTuple_New(2);
        if (column == NULL || PyList_Append(columns, column) < 0) {
            Py_XDECREF(column);
            goto done;
        }
        Py_DECREF(column);
        PyTuple_SET_ITEM(column, 0, give(&fields[i].values));
        PyTuple_SET_ITEM(column, 1, give(&fields[i].validity));
    }
    PyObject *r = give(&rows), *o = give(&ok), *d = give(&data);
    result = Py_BuildValue("(NNONnn)", r, o, columns, d, data_len, stop);
done:
    for (Py_ssize_t i = 0; held != NULL && i < count; i++)
        Py_DECREF(held[i]);
    for (int i = 0; fields != NULL && i < nfields; i++) {
        drop(&fields[i].values);
        drop(&fields[i].validity);
    }
    drop(&rows);
    drop(&ok);
    drop(&data);
    Py_XDECREF(columns);
    PyMem_Free(fields);
    PyMem_Free(bodies);
    PyMem_Free(lengths);
    PyMem_Free(held);
    PyMem_Free(row_index);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Decode flat Avro single-object values column-wise."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "schemas._flat_avro", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native_decoder(void) { return PyModule_Create(&module); }
