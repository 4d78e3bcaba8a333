"""The x86 witness guest's machine code, assembled from witness.S by
tools/gen_x86_witness.py (do not edit: rerun it). `LISTING` is its disassembly at
the guest-physical address it runs from."""

CODE = bytes.fromhex(
    "49bb215353454e5449574d31fb0f3148"
    "c1e2204809d04989c449b9d308a38588"
    "6a3f244d31f9660fefc049c706000000"
    "008b2c250c000000e84c000000ffcd75"
    "f789d866ba1005ef4101d866ba1105ed"
    "4439c00f85e7010000e8fe00000048ff"
    "c3660fd405370200004531ed8b042510"
    "00000085c074ba66ba1205ef488b0425"
    "18000000498906eba80f3148c1e22048"
    "09d04889c14c29e10f826a0100004989"
    "c4492b0e730231c949c706000000004c"
    "39e976034989cd48b8215353454e5449"
    "574c31f84c39d80f85490100004c89f8"
    "48c1e00d4805000001004c39f00f8533"
    "01000066480f7ec04839d80f85330100"
    "004d85d2742b498d42ff89c181e1ff00"
    "0000c1e1044939840e001000000f851f"
    "0100004d398c0e081000000f85110100"
    "004c89c84c31d048b9157c4a7fb97937"
    "9e480fafc148c1c01d4989c14489d181"
    "e1ff000000c1e1044d89940e00100000"
    "4d898c0e0810000049ffc2c3498dbe00"
    "010000488d35ea000000b905000000f3"
    "a44c89f8e86a000000488d35d9000000"
    "b905000000f3a44889d8e85400000048"
    "8d35c8000000b908000000f3a44c89e8"
    "b9e803000048f7e18b0c251400000048"
    "f7f1e82c000000c6070a48ffc7498db6"
    "000100004889f94829f166baf8034889"
    "c848c1e902f36fa8027402666fa80174"
    "016ec3498d7640b90a00000031d248f7"
    "f180c23048ffce88164885c075ee498d"
    "4e404829f1f3a4c3488d3557000000b9"
    "0a000000eb36488d3553000000b90b00"
    "0000eb28488d3550000000b90a000000"
    "eb1a488d354c000000b90e000000eb0c"
    "488d354c000000b90d000000e879ffff"
    "fff4ebfd766370753d207365713d2067"
    "61705f75733d50414e4943207473630a"
    "50414e494320726567730a50414e4943"
    "20786d6d0a50414e4943206a6f75726e"
    "616c0a50414e4943206465766963650a"
    "01000000000000000000000000000000"
)

LISTING = """\
0000000000001000 <entry>:
    1000:	49 bb 21 53 53 45 4e 	movabs r11,0x5749544e45535321
    1007:	54 49 57
    100a:	4d 31 fb             	xor    r11,r15
    100d:	0f 31                	rdtsc
    100f:	48 c1 e2 20          	shl    rdx,0x20
    1013:	48 09 d0             	or     rax,rdx
    1016:	49 89 c4             	mov    r12,rax
    1019:	49 b9 d3 08 a3 85 88 	movabs r9,0x243f6a8885a308d3
    1020:	6a 3f 24
    1023:	4d 31 f9             	xor    r9,r15
    1026:	66 0f ef c0          	pxor   xmm0,xmm0
    102a:	49 c7 06 00 00 00 00 	mov    QWORD PTR [r14],0x0

0000000000001031 <line>:
    1031:	8b 2c 25 0c 00 00 00 	mov    ebp,DWORD PTR ds:0xc

0000000000001038 <step>:
    1038:	e8 4c 00 00 00       	call   1089 <check_step>
    103d:	ff cd                	dec    ebp
    103f:	75 f7                	jne    1038 <step>
    1041:	89 d8                	mov    eax,ebx
    1043:	66 ba 10 05          	mov    dx,0x510
    1047:	ef                   	out    dx,eax
    1048:	41 01 d8             	add    r8d,ebx
    104b:	66 ba 11 05          	mov    dx,0x511
    104f:	ed                   	in     eax,dx
    1050:	44 39 c0             	cmp    eax,r8d
    1053:	0f 85 e7 01 00 00    	jne    1240 <panic_device>
    1059:	e8 fe 00 00 00       	call   115c <write_line>
    105e:	48 ff c3             	inc    rbx
    1061:	66 0f d4 05 37 02 00 	paddq  xmm0,XMMWORD PTR [rip+0x237]        # 12a0 <m_end>
    1068:	00
    1069:	45 31 ed             	xor    r13d,r13d
    106c:	8b 04 25 10 00 00 00 	mov    eax,DWORD PTR ds:0x10
    1073:	85 c0                	test   eax,eax
    1075:	74 ba                	je     1031 <line>
    1077:	66 ba 12 05          	mov    dx,0x512
    107b:	ef                   	out    dx,eax
    107c:	48 8b 04 25 18 00 00 	mov    rax,QWORD PTR ds:0x18
    1083:	00
    1084:	49 89 06             	mov    QWORD PTR [r14],rax
    1087:	eb a8                	jmp    1031 <line>

0000000000001089 <check_step>:
    1089:	0f 31                	rdtsc
    108b:	48 c1 e2 20          	shl    rdx,0x20
    108f:	48 09 d0             	or     rax,rdx
    1092:	48 89 c1             	mov    rcx,rax
    1095:	4c 29 e1             	sub    rcx,r12
    1098:	0f 82 6a 01 00 00    	jb     1208 <panic_tsc>
    109e:	49 89 c4             	mov    r12,rax
    10a1:	49 2b 0e             	sub    rcx,QWORD PTR [r14]
    10a4:	73 02                	jae    10a8 <check_step+0x1f>
    10a6:	31 c9                	xor    ecx,ecx
    10a8:	49 c7 06 00 00 00 00 	mov    QWORD PTR [r14],0x0
    10af:	4c 39 e9             	cmp    rcx,r13
    10b2:	76 03                	jbe    10b7 <check_step+0x2e>
    10b4:	49 89 cd             	mov    r13,rcx
    10b7:	48 b8 21 53 53 45 4e 	movabs rax,0x5749544e45535321
    10be:	54 49 57
    10c1:	4c 31 f8             	xor    rax,r15
    10c4:	4c 39 d8             	cmp    rax,r11
    10c7:	0f 85 49 01 00 00    	jne    1216 <panic_regs>
    10cd:	4c 89 f8             	mov    rax,r15
    10d0:	48 c1 e0 0d          	shl    rax,0xd
    10d4:	48 05 00 00 01 00    	add    rax,0x10000
    10da:	4c 39 f0             	cmp    rax,r14
    10dd:	0f 85 33 01 00 00    	jne    1216 <panic_regs>
    10e3:	66 48 0f 7e c0       	movq   rax,xmm0
    10e8:	48 39 d8             	cmp    rax,rbx
    10eb:	0f 85 33 01 00 00    	jne    1224 <panic_xmm>
    10f1:	4d 85 d2             	test   r10,r10
    10f4:	74 2b                	je     1121 <check_step+0x98>
    10f6:	49 8d 42 ff          	lea    rax,[r10-0x1]
    10fa:	89 c1                	mov    ecx,eax
    10fc:	81 e1 ff 00 00 00    	and    ecx,0xff
    1102:	c1 e1 04             	shl    ecx,0x4
    1105:	49 39 84 0e 00 10 00 	cmp    QWORD PTR [r14+rcx*1+0x1000],rax
    110c:	00
    110d:	0f 85 1f 01 00 00    	jne    1232 <panic_journal>
    1113:	4d 39 8c 0e 08 10 00 	cmp    QWORD PTR [r14+rcx*1+0x1008],r9
    111a:	00
    111b:	0f 85 11 01 00 00    	jne    1232 <panic_journal>
    1121:	4c 89 c8             	mov    rax,r9
    1124:	4c 31 d0             	xor    rax,r10
    1127:	48 b9 15 7c 4a 7f b9 	movabs rcx,0x9e3779b97f4a7c15
    112e:	79 37 9e
    1131:	48 0f af c1          	imul   rax,rcx
    1135:	48 c1 c0 1d          	rol    rax,0x1d
    1139:	49 89 c1             	mov    r9,rax
    113c:	44 89 d1             	mov    ecx,r10d
    113f:	81 e1 ff 00 00 00    	and    ecx,0xff
    1145:	c1 e1 04             	shl    ecx,0x4
    1148:	4d 89 94 0e 00 10 00 	mov    QWORD PTR [r14+rcx*1+0x1000],r10
    114f:	00
    1150:	4d 89 8c 0e 08 10 00 	mov    QWORD PTR [r14+rcx*1+0x1008],r9
    1157:	00
    1158:	49 ff c2             	inc    r10
    115b:	c3                   	ret

000000000000115c <write_line>:
    115c:	49 8d be 00 01 00 00 	lea    rdi,[r14+0x100]
    1163:	48 8d 35 ea 00 00 00 	lea    rsi,[rip+0xea]        # 1254 <s_vcpu>
    116a:	b9 05 00 00 00       	mov    ecx,0x5
    116f:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    1171:	4c 89 f8             	mov    rax,r15
    1174:	e8 6a 00 00 00       	call   11e3 <put_dec>
    1179:	48 8d 35 d9 00 00 00 	lea    rsi,[rip+0xd9]        # 1259 <s_seq>
    1180:	b9 05 00 00 00       	mov    ecx,0x5
    1185:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    1187:	48 89 d8             	mov    rax,rbx
    118a:	e8 54 00 00 00       	call   11e3 <put_dec>
    118f:	48 8d 35 c8 00 00 00 	lea    rsi,[rip+0xc8]        # 125e <s_gap>
    1196:	b9 08 00 00 00       	mov    ecx,0x8
    119b:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    119d:	4c 89 e8             	mov    rax,r13
    11a0:	b9 e8 03 00 00       	mov    ecx,0x3e8
    11a5:	48 f7 e1             	mul    rcx
    11a8:	8b 0c 25 14 00 00 00 	mov    ecx,DWORD PTR ds:0x14
    11af:	48 f7 f1             	div    rcx
    11b2:	e8 2c 00 00 00       	call   11e3 <put_dec>
    11b7:	c6 07 0a             	mov    BYTE PTR [rdi],0xa
    11ba:	48 ff c7             	inc    rdi
    11bd:	49 8d b6 00 01 00 00 	lea    rsi,[r14+0x100]
    11c4:	48 89 f9             	mov    rcx,rdi
    11c7:	48 29 f1             	sub    rcx,rsi

00000000000011ca <serial_write>:
    11ca:	66 ba f8 03          	mov    dx,0x3f8
    11ce:	48 89 c8             	mov    rax,rcx
    11d1:	48 c1 e9 02          	shr    rcx,0x2
    11d5:	f3 6f                	rep outs dx,DWORD PTR ds:[rsi]
    11d7:	a8 02                	test   al,0x2
    11d9:	74 02                	je     11dd <serial_write+0x13>
    11db:	66 6f                	outs   dx,WORD PTR ds:[rsi]
    11dd:	a8 01                	test   al,0x1
    11df:	74 01                	je     11e2 <serial_write+0x18>
    11e1:	6e                   	outs   dx,BYTE PTR ds:[rsi]
    11e2:	c3                   	ret

00000000000011e3 <put_dec>:
    11e3:	49 8d 76 40          	lea    rsi,[r14+0x40]
    11e7:	b9 0a 00 00 00       	mov    ecx,0xa
    11ec:	31 d2                	xor    edx,edx
    11ee:	48 f7 f1             	div    rcx
    11f1:	80 c2 30             	add    dl,0x30
    11f4:	48 ff ce             	dec    rsi
    11f7:	88 16                	mov    BYTE PTR [rsi],dl
    11f9:	48 85 c0             	test   rax,rax
    11fc:	75 ee                	jne    11ec <put_dec+0x9>
    11fe:	49 8d 4e 40          	lea    rcx,[r14+0x40]
    1202:	48 29 f1             	sub    rcx,rsi
    1205:	f3 a4                	rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]
    1207:	c3                   	ret

0000000000001208 <panic_tsc>:
    1208:	48 8d 35 57 00 00 00 	lea    rsi,[rip+0x57]        # 1266 <m_tsc>
    120f:	b9 0a 00 00 00       	mov    ecx,0xa
    1214:	eb 36                	jmp    124c <panic>

0000000000001216 <panic_regs>:
    1216:	48 8d 35 53 00 00 00 	lea    rsi,[rip+0x53]        # 1270 <m_regs>
    121d:	b9 0b 00 00 00       	mov    ecx,0xb
    1222:	eb 28                	jmp    124c <panic>

0000000000001224 <panic_xmm>:
    1224:	48 8d 35 50 00 00 00 	lea    rsi,[rip+0x50]        # 127b <m_xmm>
    122b:	b9 0a 00 00 00       	mov    ecx,0xa
    1230:	eb 1a                	jmp    124c <panic>

0000000000001232 <panic_journal>:
    1232:	48 8d 35 4c 00 00 00 	lea    rsi,[rip+0x4c]        # 1285 <m_journal>
    1239:	b9 0e 00 00 00       	mov    ecx,0xe
    123e:	eb 0c                	jmp    124c <panic>

0000000000001240 <panic_device>:
    1240:	48 8d 35 4c 00 00 00 	lea    rsi,[rip+0x4c]        # 1293 <m_device>
    1247:	b9 0d 00 00 00       	mov    ecx,0xd

000000000000124c <panic>:
    124c:	e8 79 ff ff ff       	call   11ca <serial_write>
    1251:	f4                   	hlt
    1252:	eb fd                	jmp    1251 <panic+0x5>

0000000000001254 <s_vcpu>:
    1254:	76 63                	jbe    12b9 <m_end+0x19>
    1256:	70 75                	jo     12cd <m_end+0x2d>
    1258:	3d                   	.byte 0x3d

0000000000001259 <s_seq>:
    1259:	20 73 65             	and    BYTE PTR [rbx+0x65],dh
    125c:	71 3d                	jno    129b <m_device+0x8>

000000000000125e <s_gap>:
    125e:	20 67 61             	and    BYTE PTR [rdi+0x61],ah
    1261:	70 5f                	jo     12c2 <m_end+0x22>
    1263:	75 73                	jne    12d8 <m_end+0x38>
    1265:	3d                   	.byte 0x3d

0000000000001266 <m_tsc>:
    1266:	50                   	push   rax
    1267:	41                   	rex.B
    1268:	4e                   	rex.WRX
    1269:	49                   	rex.WB
    126a:	43 20 74 73 63       	and    BYTE PTR [r11+r14*2+0x63],sil
    126f:	0a                   	.byte 0xa

0000000000001270 <m_regs>:
    1270:	50                   	push   rax
    1271:	41                   	rex.B
    1272:	4e                   	rex.WRX
    1273:	49                   	rex.WB
    1274:	43 20 72 65          	rex.XB and BYTE PTR [r10+0x65],sil
    1278:	67 73 0a             	addr32 jae 1285 <m_journal>

000000000000127b <m_xmm>:
    127b:	50                   	push   rax
    127c:	41                   	rex.B
    127d:	4e                   	rex.WRX
    127e:	49                   	rex.WB
    127f:	43 20 78 6d          	rex.XB and BYTE PTR [r8+0x6d],dil
    1283:	6d                   	ins    DWORD PTR es:[rdi],dx
    1284:	0a                   	.byte 0xa

0000000000001285 <m_journal>:
    1285:	50                   	push   rax
    1286:	41                   	rex.B
    1287:	4e                   	rex.WRX
    1288:	49                   	rex.WB
    1289:	43 20 6a 6f          	rex.XB and BYTE PTR [r10+0x6f],bpl
    128d:	75 72                	jne    1301 <m_end+0x61>
    128f:	6e                   	outs   dx,BYTE PTR ds:[rsi]
    1290:	61                   	(bad)
    1291:	6c                   	ins    BYTE PTR es:[rdi],dx
    1292:	0a                   	.byte 0xa

0000000000001293 <m_device>:
    1293:	50                   	push   rax
    1294:	41                   	rex.B
    1295:	4e                   	rex.WRX
    1296:	49                   	rex.WB
    1297:	43 20 64 65 76       	and    BYTE PTR [r13+r12*2+0x76],spl
    129c:	69                   	.byte 0x69
    129d:	63 65 0a             	movsxd esp,DWORD PTR [rbp+0xa]

00000000000012a0 <m_end>:
    12a0:	01 00                	add    DWORD PTR [rax],eax
	...
"""
